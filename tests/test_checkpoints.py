"""A checkpoint is complete or invisible: a kill while Ray Train copies it into storage
(in no particular order) leaves a folder that resume must pass over."""

import json
from pathlib import Path

from raydpo.train.checkpoints import STATE_FILE, checkpoint_problem, latest_checkpoint, write_manifest


def _checkpoint(root: Path, it: int, writers=(0,), shards=True) -> Path:
    """What PolicyTrainer.save leaves: each writing rank's files, then its manifest."""
    folder = root / "online" / f"iter-{it:06d}"
    for rank in writers:
        part = root / f"rank{rank}-{it}"  # each rank writes into its own temporary folder
        part.mkdir(parents=True)
        if rank == 0:
            (part / "model.safetensors").write_bytes(b"w" * 1000)
            (part / "optimizer.pt").write_bytes(b"o" * 500)
            (part / STATE_FILE).write_text(json.dumps({"iteration": it, "writers": list(writers)}))
        if shards:
            (part / "deepspeed").mkdir()
            (part / "deepspeed" / f"zero_rank{rank}.pt").write_bytes(b"z" * 300)
        write_manifest(part, rank)
        folder.mkdir(parents=True, exist_ok=True)
        for f in part.rglob("*"):  # Ray Train merges the ranks' folders into one
            if f.is_file():
                (folder / f.relative_to(part)).parent.mkdir(parents=True, exist_ok=True)
                (folder / f.relative_to(part)).write_bytes(f.read_bytes())
    return folder


def test_complete_checkpoints_pass(tmp_path):
    assert checkpoint_problem(_checkpoint(tmp_path, 1)) is None
    assert checkpoint_problem(_checkpoint(tmp_path, 2, writers=(0, 1))) is None
    assert latest_checkpoint(tmp_path, "online", pattern="iter-*", key="iteration")[1]["iteration"] == 2


def test_a_cut_or_missing_file_or_manifest_hides_the_newer_checkpoint(tmp_path, capsys):
    _checkpoint(tmp_path, 1)
    cases = {
        2: lambda f: (f / "model.safetensors").write_bytes(b"w" * 10),  # copy cut mid-file
        3: lambda f: (f / "optimizer.pt").unlink(),  # optimizer state never arrived
        4: lambda f: (f / "manifest-rank1.json").unlink(),  # rank 1's ZeRO shards not all copied
        5: lambda f: (f / "deepspeed" / "zero_rank1.pt").unlink(),
    }
    for it, damage in cases.items():
        damage(_checkpoint(tmp_path, it, writers=(0, 1)))
    found = latest_checkpoint(tmp_path, "online", pattern="iter-*", key="iteration")
    assert found[0].name == "iter-000001"
    err = capsys.readouterr().err
    assert "iter-000002" in err and "model.safetensors has 10 of 1000 bytes" in err
    assert "optimizer.pt is missing" in err and "rank 1's manifest is missing" in err


def test_a_state_file_without_weights_is_not_a_checkpoint(tmp_path):
    folder = tmp_path / "online" / "iter-000001"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"iteration": 1}))  # what the old check accepted
    assert checkpoint_problem(folder) is not None
    assert latest_checkpoint(tmp_path, "online", pattern="iter-*", key="iteration") is None


def test_a_restart_reads_ray_trains_checkpoint_in_place(tmp_path, monkeypatch):
    """After a worker restart the learner reads Ray Train's checkpoint where it is stored;
    no copy of it (weights and optimizer state) is left behind in the temp folder."""
    import tempfile
    from types import SimpleNamespace

    import ray.train

    from raydpo.train.checkpoints import resume_directory

    folder = _checkpoint(tmp_path, 4)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(folder)))
    with resume_directory(SimpleNamespace(resume_from=None)) as resume_dir:
        assert json.loads((Path(resume_dir) / STATE_FILE).read_text())["iteration"] == 4
        assert Path(resume_dir) == folder
    assert list((tmp_path / "tmp").iterdir()) == []

    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    with resume_directory(SimpleNamespace(resume_from="/runs/x/dpo-step-000002")) as resume_dir:
        assert resume_dir == "/runs/x/dpo-step-000002"
