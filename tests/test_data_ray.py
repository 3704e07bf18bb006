"""The Ray Data path gives the same records, errors and tokens as the
single-process path. (Streaming into Ray Train workers is exercised by every fit in
test_train, whose 2-worker run must match the 1-worker run step for step.)"""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from raydpo.data.formats import validate_paths
from raydpo.data.tokenize import tokenize_batch
from tests.test_data_formats import BAD_CASES, CONVERSATIONAL, OPENAI_EXAMPLE, STANDARD

import pytest

pytestmark = pytest.mark.slow  # starts Ray, vLLM or Serve, or trains: `make test-fast` leaves it out


def make_folder(tmp_path):
    lines = [json.dumps(STANDARD).encode(), json.dumps(CONVERSATIONAL).encode()]
    lines += [line for line, _ in BAD_CASES]
    lines += [json.dumps({**STANDARD, "chosen": f" apple {i}."}).encode() for i in range(21)]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    pq.write_table(pa.Table.from_pylist([OPENAI_EXAMPLE, {"prompt": "x", "chosen": "y", "rejected": "y"}]),
                   tmp_path / "b.parquet")
    return tmp_path


def test_ray_data_validation_matches_local(tmp_path, ray_local):
    from raydpo.data.pipeline import read_pairs

    folder = make_folder(tmp_path)
    local_good, local_report = validate_paths([str(folder)])
    ds, report = read_pairs(str(folder))
    ray_good = sorted(ds.take_all(), key=lambda r: (r["source"], r["line"]))
    assert [(r["source"], r["line"], r["prompt"], r["chosen"]) for r in ray_good] == \
        [(p.source, p.line, p.prompt, p.chosen) for p in local_good]
    assert report.good == local_report.good == 24
    assert report.bad == local_report.bad and sum(report.bad.values()) == len(BAD_CASES) + 1
    assert [str(b) for b in report.examples] == [str(b) for b in local_report.examples]  # both in (file, line) order


def test_ray_data_strict_names_first_bad(tmp_path, ray_local):
    import pytest

    from raydpo.data.formats import DataError
    from raydpo.data.pipeline import read_pairs

    folder = make_folder(tmp_path)
    with pytest.raises(DataError, match=r"a\.jsonl:3: invalid JSON"):
        read_pairs(str(folder), strict=True)


def test_ray_dataset_input(ray_local):
    import ray

    from raydpo.data.pipeline import read_pairs

    ds = ray.data.from_items([{**STANDARD, "id": 1}, {"id": 2, "prompt": "p", "chosen": "", "rejected": "r"}])
    good, report = read_pairs(ds)
    assert good.count() == 1 and [str(b) for b in report.examples] == ["<dataset>:2: empty response (chosen)"]


def test_tokenize_on_ray_matches_local_and_counts_truncation(tmp_path, ray_local, tiny_model_dir, tiny_tokenizer):
    from raydpo.data.pipeline import read_pairs, tokenize, truncation_counts

    folder = make_folder(tmp_path)
    good, _ = read_pairs(str(folder))
    tok_ds = tokenize(good, str(tiny_model_dir), max_prompt_length=12, max_length=24, concurrency=2, batch_size=4)
    rows = sorted(tok_ds.take_all(), key=lambda r: (r["source"], r["line"]))
    local_pairs, _ = validate_paths([str(folder)])
    cols = {k: [getattr(p, k) for p in local_pairs] for k in ("prompt", "chosen", "rejected", "is_chat", "tools")}
    expected = tokenize_batch(cols, tiny_tokenizer, 12, 24)
    for i, r in enumerate(rows):
        for k in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert list(r[k]) == expected[k][i], (i, k)
    counts = truncation_counts(tok_ds)
    assert counts == {"prompt_truncated": sum(expected["prompt_truncated"]),
                      "response_truncated": sum(expected["response_truncated"])}
    assert counts["prompt_truncated"] > 0  # the chat prompts do not fit 12 tokens


def test_the_loops_ray_data_warm_up_waits_for_the_stats_actor(ray_local):
    """The first Ray Data execution only asks Ray to create its stats actor; the process starts
    (about a second of CPU) after `materialize` returns. The warm-up waits for it, so iteration 1
    does not share its CPUs with that start."""
    import time

    import ray
    from ray.data._internal.stats import STATS_ACTOR_NAME as name, STATS_ACTOR_NAMESPACE as namespace
    from ray.util.state import list_actors

    from raydpo.online.training_data import warm_up_ray_data

    try:
        ray.kill(ray.get_actor(name, namespace=namespace))  # earlier tests' Ray Data started one
    except ValueError:
        pass
    deadline = time.monotonic() + 30
    # this session's Ray by address: without it the state API picks the newest of the machine's Rays
    # (the suite's other worker and its test clusters have their own)
    address = ray.get_runtime_context().gcs_address

    def states() -> list[str]:
        return [a.state for a in list_actors(address=address, filters=[("name", "=", name)]) if a.state != "DEAD"]

    while states():
        assert time.monotonic() < deadline, "the stats actor did not die"
        time.sleep(0.1)
    warm_up_ray_data().join()
    assert states() == ["ALIVE"]
