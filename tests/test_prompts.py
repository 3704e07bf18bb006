"""Prompt files: bad records named by file and line, good ones kept, skipped ones counted;
eval prompts that are also training prompts are counted and warned about."""

import json

import pytest

from raydpo.data.formats import DataError, read_prompts


def _write(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_prompt_records_are_named_by_file_and_line(tmp_path):
    f = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": "a"}).encode(), b'{"prompt": "b"', b"",
                                      json.dumps({"text": "c"}).encode(), json.dumps({"prompt": ""}).encode(),
                                      b"\xff\xfe", json.dumps(["x"]).encode(), json.dumps({"prompt": "d"}).encode()])
    prompts, report = read_prompts(str(f))
    assert prompts == ["a", "d"] and report.good == 2 and sum(report.bad.values()) == 5
    named = [str(b) for b in report.examples]
    assert named[0].startswith(f"{f}:2: invalid JSON")
    assert named[1].startswith(f"{f}:4: missing 'prompt'")
    assert named[2] == f"{f}:5: 'prompt' must be a non-empty string"
    assert named[3].startswith(f"{f}:6: non-UTF-8")
    assert named[4].startswith(f"{f}:7: a record must be a JSON object")


def test_prompt_source_keeps_the_good_and_fails_clearly_on_none(tmp_path):
    from raydpo.online.prompts import PromptSource

    f = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": f"p{i}"}).encode() for i in range(5)] + [b"{bad"])
    src = PromptSource(f, seed=0)
    assert src.size == 5 and src.bad == 1 and sorted(src.all()) == [f"p{i}" for i in range(5)]
    empty = _write(tmp_path / "e.jsonl", [b"{bad"])
    with pytest.raises(DataError, match=r"no usable prompts \(1 bad records; first: .*e.jsonl:1: invalid JSON"):
        PromptSource(empty, seed=0)


def test_eval_prompts_that_are_training_prompts_are_counted_and_warned(capsys):
    from raydpo.online.prompts import warn_overlap

    assert warn_overlap(["a", "b", "c"], ["x", "y"]) == 0 and "WARNING" not in capsys.readouterr().out
    assert warn_overlap(["a", "b", "c"], ["b", "c", "z"]) == 2
    assert "2 of the 3 eval prompts are also training prompts" in capsys.readouterr().out


def test_prompt_windows_follow_one_seeded_order_without_ray(tmp_path):
    """The order is numpy's seeded permutation, fixed by (file, seed) alone: not by Ray Data's
    block layout, which follows the cluster's CPUs."""
    import numpy as np

    from raydpo.online.prompts import PromptSource

    names = [f"p{i}" for i in range(10)]
    f = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": n}).encode() for n in names])
    src = PromptSource(f, seed=7)
    order = [names[i] for i in np.random.default_rng(7).permutation(10)]
    assert src.all() == order != names
    assert src.window(1, 4) == order[:4] and src.window(2, 4) == order[4:8]
    assert src.window(3, 4) == order[8:] + order[:2]  # the epoch wraps: its end, then its start
    assert PromptSource(f, seed=8).all() != order and PromptSource(f, seed=7).all() == order
