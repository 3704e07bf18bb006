"""The one place a Ray Train `TorchTrainer` is built: the staged jobs (`raydpo.train.staged`)
and the online trainer (`raydpo.train.online_client`) differ only in what they pass here."""

from __future__ import annotations

from pathlib import Path


def build_trainer(loop_fn, loop_config: dict, cfg, name: str, storage: Path, *, keep: int | None,
                  datasets: dict | None = None):
    """A TorchTrainer shaped by cluster.trainer (workers, CPUs and GPUs each), recovering
    trainer.max_failures worker failures from the last checkpoint, keeping the newest `keep`
    checkpoints (None: all) under <storage>/<name>. `datasets` are read whole by every worker,
    in a fixed order: raydpo cuts global batches itself (`raydpo.train.staged`)."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    res = cfg.cluster.trainer
    extra = {}
    if datasets:
        exec_opts = ray.data.ExecutionOptions(preserve_order=True)  # same row order on every worker, every run
        extra = {"datasets": datasets, "dataset_config": DataConfig(datasets_to_split=[], execution_options=exec_opts)}
    return TorchTrainer(
        loop_fn,
        train_loop_config={**loop_config, "cpus_per_worker": res.cpus, "cpu_ids": res.cpu_ids},
        scaling_config=ScalingConfig(num_workers=res.count, use_gpu=res.gpus > 0,
                                     resources_per_worker={"CPU": res.cpus, **({"GPU": res.gpus} if res.gpus else {}),
                                                           **res.resources}),
        run_config=TrainRunConfig(name=name, storage_path=str(storage),
                                  failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=keep)),
        **extra,
    )
