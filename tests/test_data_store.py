"""The Parquet preference store: round trip, idempotent chunks, and a writer
killed mid-write leaves nothing that reads as data."""

import os
import signal
import subprocess
import sys
import time

import pytest

from raydpo.data.store import PreferenceStore, StoredPair


def pairs(iteration, n, tag="x"):
    return [StoredPair(f"{tag}-{iteration}-{i}", iteration, iteration - 1, "online", f"p{i}", f"c{i}", f"r{i}",
                       1.0, 0.25, "rule:v1") for i in range(n)]


def test_round_trip_and_partitions(tmp_path):
    st = PreferenceStore(tmp_path / "store")
    assert st.count() == 0
    st.write_chunk(1, 0, pairs(1, 3))
    st.write_chunk(1, 1, pairs(1, 2, tag="y"))
    st.write_chunk(2, 0, pairs(2, 4))
    got = st.read_pairs()
    assert len(got) == 9 and got[0] == pairs(1, 3)[0]
    assert sorted({p.iteration for p in got}) == [1, 2]
    assert (tmp_path / "store" / "iteration=000002" / "chunk-00000.parquet").exists()


def test_rewriting_a_chunk_replaces_it(tmp_path):
    st = PreferenceStore(tmp_path)
    st.write_chunk(3, 0, pairs(3, 5))
    st.write_chunk(3, 0, pairs(3, 5))  # a resumed loop redoing the chunk
    assert st.count() == 5 and st.has_chunk(3, 0) and not st.has_chunk(3, 1)


def test_iteration_mismatch_refused(tmp_path):
    with pytest.raises(ValueError, match="chunk is for 2"):
        PreferenceStore(tmp_path).write_chunk(2, 0, pairs(1, 1))


WRITER = """
import sys
from raydpo.data.store import PreferenceStore, StoredPair
big = "x" * 2000
st = PreferenceStore(sys.argv[1])
rows = [StoredPair(f"k{i}", 5, 4, "online", big, big + str(i), big, 1.0, 0.0, "rule") for i in range(400000)]
print("ready", flush=True)
st.write_chunk(5, 0, rows)
print("done", flush=True)
"""


def test_killed_writer_leaves_no_partial_file(tmp_path):
    root = tmp_path / "store"
    st = PreferenceStore(root)
    st.write_chunk(4, 0, pairs(4, 7))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    # wait until the writer has started its file under _staging, then kill it mid-write
    deadline = time.time() + 60
    while time.time() < deadline and not any(f.stat().st_size > 0 for f in (root / "_staging").glob("*")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    leftovers = list((root / "_staging").glob("*"))
    assert leftovers, "the kill was meant to land mid-write"
    assert not st.has_chunk(5, 0)
    assert st.count() == 7  # pyarrow reader: only the committed chunk
    assert st.clean_staging() == len(leftovers) and st.count() == 7


def test_a_chunk_keeps_its_judging_counts(tmp_path):
    from raydpo.data.store import PreferenceStore

    store = PreferenceStore(tmp_path / "s")
    store.write_chunk(1, 0, [], counts={"pairs": 0, "ties": 3, "identical": 1})
    store.write_chunk(1, 1, [])
    assert store.chunk_counts(1, 0) == {"pairs": 0, "ties": 3, "identical": 1}
    assert store.chunk_counts(1, 1) is None
    assert store.read_table([1]).num_rows == 0  # the metadata does not disturb reading


def test_pairs_without_sampler_ids_are_refused_by_name(tmp_path):
    import pytest

    from raydpo.data.store import PreferenceStore, StoredPair, training_rows

    store = PreferenceStore(tmp_path / "s")
    store.write_chunk(1, 0, [StoredPair(pair_id="a", iteration=1, policy_version=0, source="online", prompt="p",
                                        chosen="c", rejected="r", chosen_score=1.0, rejected_score=0.0, judge="j")])
    with pytest.raises(ValueError, match="without sampler token ids .*prompt_token_ids.*start a new run_dir"):
        training_rows(store.read_table([1]))


def test_an_iteration_without_pairs_gives_zero_training_rows(tmp_path):
    """Every prompt a tie (or every pair too stale): the loop trains on nothing rather than
    failing in pyarrow (an empty list made a null-typed mask that 'and' has no kernel for)."""
    from raydpo.data.store import training_rows

    store = PreferenceStore(tmp_path / "s")
    store.write_chunk(1, 0, [], counts={"pairs": 0, "ties": 4})
    for truncated in ("keep", "drop"):
        rows, counts = training_rows(store.read_table([1]), truncated, max_length=64)
        assert rows.num_rows == 0 and counts.rows == 0 and counts.over_length_dropped == 0
        assert rows.column_names == ["pair_id", "prompt_ids", "chosen_ids", "rejected_ids"]


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    from raydpo.files import atomic_write

    target = tmp_path / "out" / "chunk.parquet"
    atomic_write(target, "old\n")

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    for staging in (None, tmp_path / "staging"):
        with pytest.raises(OSError, match="disk full"):
            atomic_write(target, fail, tmp_dir=staging, durable=True)
        assert target.read_text() == "old\n"
        assert sorted(p.name for p in target.parent.iterdir()) == ["chunk.parquet"]
        assert staging is None or list(staging.iterdir()) == []
