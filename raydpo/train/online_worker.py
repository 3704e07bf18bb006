"""The online loop's trainer: one long-lived Ray Train run for every iteration.

Ray Train costs seconds to start a run (measured: ~15 s on 2 cores); paying it
per iteration would dwarf the training itself. So the loop starts one
`TorchTrainer` whose workers stay up and take commands from a `Mailbox` actor:

    {"op": "train", "iteration": i, "dataset": <Ray Dataset of tokenized pairs>,
     "passes": p, "refresh_reference": bool}
        -> {"steps", "pairs", "metrics" (mean of the last pass), "seconds",
            "weights": ObjectRef of the new numpy state dict, "checkpoint": path}
    {"op": "kl", "iteration": i, "rows": {"prompt_ids": [...], "response_ids": [...]}}
        -> {"kl": mean log pi(y|x) - log pi_ref(y|x) over the rows, "n": rows}
    {"op": "stop"}

Every worker reads every command and the whole dataset of a train command (the
deterministic global-batch sharding of `raydpo.train.worker`); rank 0 replies.
After each train command the workers report an HF checkpoint named
``iter-NNNNNN`` through `ray.train.report`, so a worker failure restarts from
the last finished iteration (`FailureConfig`): the restarted workers skip the
train commands that checkpoint already covers and redo the rest. A driver
restart (``--resume``) starts a new run from the same folder.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from raydpo.data.collate import collate_pairs
from raydpo.train.step import forward_logps, reference_logps
from raydpo.train.worker import MetricsLog, PolicyTrainer, TrainSpec, global_batches, resume_directory
from raydpo.weights import tied_weight_keys, with_tied_head


class Mailbox:
    """Commands from the driver to the trainer workers and rank 0's replies.

    Wrapped with `ray.remote(num_cpus=0)` by the driver; async, so a worker
    waiting for the next command does not block the driver posting it.
    """

    def __init__(self):
        self.commands: list[dict] = []
        self.replies: dict[int, dict] = {}
        self._changed = asyncio.Event()
        self._alive = time.monotonic()  # the workers' last sign of life

    async def alive(self) -> None:
        """A worker's heartbeat while it runs a command (fire-and-forget, every few seconds)."""
        self._alive = time.monotonic()

    async def silent_s(self) -> float:
        """Seconds since the workers last showed life (stepped, replied or asked for a command)."""
        return time.monotonic() - self._alive

    async def post(self, command: dict) -> int:
        self.commands.append(command)
        self._wake()
        return len(self.commands) - 1

    async def next(self, seq: int, timeout_s: float) -> dict | None:
        """Command number `seq`, waiting up to `timeout_s` for it (None if none yet)."""
        self._alive = time.monotonic()
        return await self._wait(lambda: self.commands[seq] if seq < len(self.commands) else None, timeout_s)

    async def reply(self, seq: int, result: dict) -> None:
        self._alive = time.monotonic()
        self.replies.setdefault(seq, result)  # a restarted worker's repeat reply does not overwrite
        self._wake()

    async def result(self, seq: int, timeout_s: float) -> dict | None:
        return await self._wait(lambda: self.replies.get(seq), timeout_s)

    async def done(self, seq: int) -> None:
        """The driver has command `seq`'s reply: drop the reply (a full weights copy) and what
        answered commands carried (datasets), which the mailbox would otherwise keep alive in
        the object store for the whole run. A command stays as a tombstone, so a worker
        restarted from a checkpoint still counts its way through the sequence."""
        self.replies.pop(seq, None)
        self.replies[seq] = {"done": True}  # a late repeat reply from a restarted worker is not kept
        # The newest answered train command keeps its dataset until the next one is answered:
        # Ray Train registers a reported checkpoint a moment after report() returns, so workers
        # restarted in that moment resume from the previous checkpoint and must retrain it.
        newest_train = max((i for i in range(seq + 1) if self.commands[i]["op"] == "train"), default=None)
        for i in range(seq + 1):
            cmd = self.commands[i]
            if i != newest_train and not cmd.get("done"):
                self.commands[i] = {"op": cmd["op"], "iteration": cmd.get("iteration", -1), "done": True}

    async def held(self) -> dict:
        """What the mailbox still holds (for tests): commands with their payload, and replies."""
        return {"commands": sum(not c.get("done") for c in self.commands),
                "replies": sum(not r.get("done") for r in self.replies.values())}

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, get, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        while (got := get()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                return None
        return got


def _start_heartbeat(mailbox, every_s: float = 5.0) -> threading.Event:
    """While the returned event is set (a command is running), tell the mailbox every few
    seconds that this worker process is alive, for the driver's stall check: also through
    phases with no optimizer step (loading the dataset, gathering weights, saving and
    uploading a checkpoint). A process that died or hangs outside Python stops beating."""
    busy = threading.Event()

    def beat():
        while True:
            time.sleep(every_s)
            if busy.is_set():
                mailbox.alive.remote()

    threading.Thread(target=beat, name="raydpo-heartbeat", daemon=True).start()
    return busy


def _rows(ds) -> int:
    return ds.count()


def online_loop_per_worker(config: dict) -> None:
    """Ray Train entry point of the online trainer; see the module docstring."""
    import ray
    import ray.train

    spec = TrainSpec.from_dict(config["spec"])
    mailbox = config["mailbox"]
    fault = config.get("fault") or {}  # tests only: {"die_after_report": iteration, "marker": path}
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))  # see raydpo.train.worker
    torch.manual_seed(spec.seed)
    trainer = PolicyTrainer(spec, config, total_steps=1 << 30, resume_dir=resume_directory(spec))
    done_iteration = trainer.state.get("iteration", 0)
    step = trainer.state.get("step", 0)
    rank = trainer.rank
    log = MetricsLog(spec.run_dir, total=None, initial=step, prefix=spec.metrics_prefix) if rank == 0 else None
    seq = 0
    busy = _start_heartbeat(mailbox)
    while True:
        cmd = ray.get(mailbox.next.remote(seq, 30.0))
        if cmd is None:
            continue  # the driver is sampling, judging or evaluating
        op = cmd["op"]
        if op == "stop":
            break
        if cmd.get("done"):
            if op == "train" and cmd["iteration"] > done_iteration:
                raise RuntimeError(f"restarted from the checkpoint of iteration {done_iteration}, but iteration "
                                   f"{cmd['iteration']} was already answered and its data released: the "
                                   f"checkpoint it reported is missing; resume the run with --resume")
            seq += 1  # answered before this worker (re)started; its payload is gone
            continue
        t0 = time.perf_counter()
        busy.set()
        if op == "train" and cmd["iteration"] == done_iteration and "reply" in trainer.state:
            # In the checkpoint this worker restarted from, but never answered: the rank died
            # between ray.train.report and its reply. Answer from the checkpoint, or the
            # driver would wait for a reply nobody sends.
            full = trainer.state_dict()  # every rank (ZeRO-3 gathers)
            weights = ray.put({k: v.numpy() for k, v in full.items()}) if rank == 0 else None
            reply = {**trainer.state["reply"], "weights": [weights], "seconds": time.perf_counter() - t0,
                     "timing": {}, "from_checkpoint": True}
        elif op == "train" and cmd["iteration"] <= done_iteration:
            seq += 1  # already in the checkpoint this worker restarted from, and answered
            busy.clear()
            continue
        elif op == "train":
            if cmd.get("refresh_reference") and trainer.reference is not None and not spec.lora_r:
                full = trainer.state_dict()  # every rank (ZeRO-3 gathers)
                trainer.reference.load_state_dict(with_tied_head(full, tied_weight_keys(trainer.reference)))
            ds = cmd["dataset"]
            last_pass: list[dict] = []
            n_pairs = _rows(ds)
            timing = {"setup": time.perf_counter() - t0}
            t_pass = time.perf_counter()
            for p in range(cmd["passes"]):
                windows = ds.iter_batches(batch_size=spec.batch_size * spec.bucket_window, batch_format="numpy")
                last_pass = []
                seed = spec.seed + 1000 * cmd["iteration"] + p  # a new batch order each pass and iteration
                # a short tail batch is trained too (DDP): an iteration's few dozen pairs
                # rarely fill whole batches. DeepSpeed's fixed accumulation needs full ones.
                for gbatch in global_batches(windows, spec.batch_size, seed, drop_last=trainer.engine is not None,
                                             length=trainer.layout.length):
                    if len(gbatch["prompt_ids"]) < trainer.world:
                        continue  # fewer rows than workers: nothing to split
                    metrics = trainer.step(gbatch)
                    step += 1
                    last_pass.append(metrics)
                    if log:
                        log.log(step, {**metrics, "iteration": cmd["iteration"]})
            timing["passes"] = time.perf_counter() - t_pass
            done_iteration = cmd["iteration"]
            keys = sorted({k for m in last_pass for k in m})
            mean = {k: sum(m[k] for m in last_pass) / len(last_pass) for k in keys} if last_pass else {}
            answer = {"steps": len(last_pass) * cmd["passes"], "pairs": n_pairs, "metrics": mean, "step": step}
            # the reply rides in the checkpoint: a rank that dies after reporting is answered from it
            state = {"iteration": done_iteration, "step": step, "mode": "online", "final": False, "reply": answer}
            t_ckpt = time.perf_counter()
            full = trainer.state_dict()
            weights = ray.put({k: v.numpy() for k, v in full.items()}) if rank == 0 else None
            timing["weights"] = time.perf_counter() - t_ckpt
            t_ckpt = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                trainer.save(Path(tmp), state)
                ckpt = ray.train.Checkpoint.from_directory(tmp) if trainer.writes_checkpoint else None
                ray.train.report({"iteration": done_iteration, "step": step}, checkpoint=ckpt,
                                 checkpoint_dir_name=f"iter-{done_iteration:06d}")
            timing["checkpoint"] = time.perf_counter() - t_ckpt
            if fault.get("die_after_report") == done_iteration and rank == 0 and not Path(fault["marker"]).exists():
                Path(fault["marker"]).touch()  # once
                time.sleep(fault.get("after_s", 0))  # let Ray Train register the reported checkpoint
                os._exit(1)  # fault injection (tests): reported, never replied
            reply = {**answer, "seconds": time.perf_counter() - t0, "weights": [weights], "timing": timing}
        elif op == "kl":
            reply = {**_kl(trainer, cmd["rows"]), "seconds": time.perf_counter() - t0}
        else:
            raise ValueError(f"online trainer: unknown command {op!r}")
        if rank == 0:
            ray.get(mailbox.reply.remote(seq, reply))
        busy.clear()
        seq += 1
    if log:
        log.close()


@torch.no_grad()
def _kl(trainer: PolicyTrainer, rows: dict, batch: int = 64) -> dict:
    """Mean over responses y ~ pi of log pi(y|x) - log pi_ref(y|x): a Monte-Carlo
    estimate of KL(pi || pi_ref) in nats per response, when the responses were
    sampled from the current policy at temperature 1."""
    if trainer.reference is None:
        return {"kl": float("nan"), "n": 0}
    model = trainer.unwrapped
    was_training = model.training
    model.eval()
    total, n = 0.0, len(rows["prompt_ids"])
    for s in range(0, n, batch):
        # chosen = rejected = y: the collated batch's first half is what we score
        part = {"prompt_ids": rows["prompt_ids"][s:s + batch], "chosen_ids": rows["response_ids"][s:s + batch],
                "rejected_ids": rows["response_ids"][s:s + batch]}
        mb = {k: v.to(trainer.device) for k, v in collate_pairs(part, trainer.pad_id).items()}
        pol = forward_logps(model, mb).chunk(2)[0]
        ref = reference_logps(trainer.reference, mb)[0]
        total += float((pol - ref).sum())
    model.train(was_training)
    return {"kl": total / max(1, n), "n": n}
