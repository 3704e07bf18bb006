"""The online loop's trainer, on the driver side: `TrainerClient` starts the long-lived
Ray Train run (`raydpo.train.online`) in a driver thread and talks to its workers through
the `Mailbox` actor, with the typed requests and results of `raydpo.records`."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

from raydpo.errors import TrainerError
from raydpo.records import KLRequest, KLResult, StopRequest, TrainRequest, TrainResult


def latest_iteration_checkpoint(storage: str | Path, name: str = "online") -> tuple[Path, dict] | None:
    """(folder, trainer_state) of the online run's newest complete ``iter-NNNNNN`` checkpoint."""
    from raydpo.train.checkpoints import latest_checkpoint

    return latest_checkpoint(storage, name, pattern="iter-*", key="iteration")


# Ray Train's controller takes a worker's report off a one-slot queue once per health check
# (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: 2 s by default, 0.5 s in a local raydpo Ray), and the
# next report waits for the slot, so no online iteration took less than one interval
# (measured: 0.49-0.51 s an iteration at 0.5 s). The online trainer reports once an iteration:
# its controller checks this often: a status poll of each worker per check (its cost was not
# measured apart; the loop's iterations got faster with it).
ONLINE_HEALTH_CHECK_S = 0.1


class TrainerClient:
    """The trainer workers of the whole loop: one `TorchTrainer.fit()` running in a
    driver thread, fed through a `Mailbox` actor."""

    def __init__(self, cfg, start_path: str, run_dir: str, pad_id: int, resume_from: str | None = None,
                 name: str = "online", fault: dict | None = None):
        """`start_path`: the starting policy (weights, and the fixed reference); `fault`:
        tests only, fault injection in the workers (`raydpo.train.online`)."""
        import ray

        from raydpo.cluster import on_this_node
        from raydpo.train.online import Mailbox, online_loop_per_worker
        from raydpo.train.ray_train import build_trainer
        from raydpo.train.spec import make_spec

        self.stall_timeout_s = cfg.trainer.stall_timeout_s
        # Ray Train hands this from the driver's environment to the controller fit() starts
        # (for the rest of this process: the online driver starts no other fit after this one)
        try:
            asked = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S") or 2.0)
        except ValueError:  # not a number: Ray Train would fail on it too
            asked = ONLINE_HEALTH_CHECK_S
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(min(asked, ONLINE_HEALTH_CHECK_S))
        spec = make_spec(cfg, "dpo", start_path, run_dir, metrics_prefix="online/", max_steps=0, epochs=1,
                         resume_from=resume_from, reference_once=cfg.trainer.reference_logps == "precomputed")
        if cfg.loop.rpo_alpha is not None:  # the loop's own default (see LoopConfig.rpo_alpha)
            spec = dataclasses.replace(spec, loss=dataclasses.replace(spec.loss, rpo_alpha=cfg.loop.rpo_alpha))
        self.storage = Path(run_dir, "ray_train").resolve()
        self.mailbox = ray.remote(num_cpus=0)(Mailbox).options(**on_this_node()).remote()
        self._trainer = build_trainer(online_loop_per_worker, {"spec": spec.to_dict(), "mailbox": self.mailbox,
                                                               "pad_id": pad_id, "fault": fault},
                                      cfg, name, self.storage, keep=None)
        self._error: list[BaseException] = []
        self._thread = threading.Thread(target=self._fit, name="raydpo-online-trainer", daemon=True)
        self._thread.start()

    def _fit(self) -> None:
        try:
            self._trainer.fit()
        except BaseException as e:  # surfaced to the loop by _call
            self._error.append(e)

    def _call(self, command, timeout_s: float):
        import ray

        seq = ray.get(self.mailbox.post.remote(command))
        deadline = time.monotonic() + timeout_s
        while True:
            reply = ray.get(self.mailbox.result.remote(seq, 5.0))
            if reply is not None:
                ray.get(self.mailbox.done.remote(seq))  # the mailbox lets go of the dataset and weights
                return reply
            if not self._thread.is_alive():
                cause = self._error[0] if self._error else "it exited"
                raise TrainerError(f"the online trainer stopped before answering {command.op!r}: {cause}")
            silent = ray.get(self.mailbox.silent_s.remote())
            if silent > self.stall_timeout_s:
                raise TrainerError(f"the online trainer's workers showed no sign of life for {silent:.0f}s while "
                                   f"{command.op!r} (iteration {command.iteration}) was pending "
                                   f"(trainer.stall_timeout_s={self.stall_timeout_s:g}); see the Ray Train logs "
                                   f"under {self.storage}")
            if time.monotonic() > deadline:
                raise TrainerError(f"the online trainer did not answer {command.op!r} within {timeout_s}s")

    def train(self, iteration: int, dataset, passes: int, refresh_reference: bool,
              timeout_s: float = 3600, engines: tuple = (), kept: dict | None = None) -> TrainResult:
        """`engines`: sampler.weight_transport=nccl (GPU only, never run here), the sampler
        actors the new weights are broadcast into; else they come back in the object store.
        `kept`: what the driver kept of the stored pairs, saved with the reply (`trained_row`)."""
        return self._call(TrainRequest(iteration, dataset, passes, refresh_reference, engines, dict(kept or {})),
                          timeout_s)

    def kl(self, prompt_ids: list[list[int]], response_ids: list[list[int]], timeout_s: float = 600,
           policy_logps: list[float] | None = None) -> KLResult:
        return self._call(KLRequest(prompt_ids, response_ids, policy_logps=policy_logps), timeout_s)

    def close(self, timeout_s: float = 120) -> None:
        import ray

        ray.get(self.mailbox.post.remote(StopRequest()))
        self._thread.join(timeout_s)
        if self._error:
            raise TrainerError(f"the online trainer failed: {self._error[0]}")
