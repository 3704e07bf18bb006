"""The online loop's trainer, on the worker side: one long-lived Ray Train run for every iteration.

Starting a Ray Train run costs many seconds (a controller, a worker group, model
imports in every worker); paying it per iteration would dwarf the training itself. So the loop starts one
`TorchTrainer` whose workers stay up and take commands from a `Mailbox` actor
(the driver's side is `raydpo.train.online_client.TrainerClient`):

    TrainRequest(iteration, dataset, passes, refresh_reference) -> TrainResult
    KLRequest(prompt_ids, response_ids)                          -> KLResult
    StopRequest()

(`raydpo.records`). Every worker reads every command and the whole dataset of a
train command (the deterministic global-batch sharding of `raydpo.train.staged`);
rank 0 replies. After each train command the workers report an HF checkpoint
named ``iter-NNNNNN`` through `ray.train.report`, so a worker failure restarts
from the last finished iteration (`FailureConfig`): the restarted workers skip
the train commands that checkpoint already covers and redo the rest. A driver
restart (``--resume``) starts a new run from the same folder.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import tempfile
import threading
import time
from pathlib import Path

import torch

from raydpo.data.collate import REFERENCE_COLUMNS, collate_pairs
from raydpo.errors import TrainerError
from raydpo.records import Answered, KLRequest, KLResult, StopRequest, TrainRequest, TrainResult
from raydpo.train.checkpoints import resume_directory
from raydpo.train.learner import Learner, warm_up_save
from raydpo.train.metrics import MetricsLog
from raydpo.train.spec import TrainSpec
from raydpo.train.staged import global_batches
from raydpo.train.step import forward_logps, frozen_logps
from raydpo.weights import tied_weight_keys, with_tied_head


class Mailbox:
    """Commands from the driver to the trainer workers and rank 0's replies.

    Wrapped with `ray.remote(num_cpus=0)` by the driver; async, so a worker
    waiting for the next command does not block the driver posting it.
    """

    def __init__(self):
        # A train command carries a Dataset, unpickled here first: import Ray Data while the loop
        # starts, not on the first command's arrival (0.6 s measured on 2 cores, inside iteration 1).
        # The workers have it already (Ray Train imports it).
        importlib.import_module("ray.data")
        self.commands: list = []  # TrainRequest | KLRequest | StopRequest, or Answered once replied to
        self.replies: dict[int, object] = {}  # TrainResult | KLResult, or Answered once collected
        self._changed = asyncio.Event()
        self._alive = time.monotonic()  # the workers' last sign of life

    async def alive(self) -> None:
        """A worker's heartbeat while it runs a command (fire-and-forget, every few seconds)."""
        self._alive = time.monotonic()

    async def silent_s(self) -> float:
        """Seconds since the workers last showed life (stepped, replied or asked for a command)."""
        return time.monotonic() - self._alive

    async def post(self, command) -> int:
        self.commands.append(command)
        self._wake()
        return len(self.commands) - 1

    async def next(self, seq: int, timeout_s: float):
        """Command number `seq`, waiting up to `timeout_s` for it (None if none yet)."""
        self._alive = time.monotonic()
        return await self._wait(lambda: self.commands[seq] if seq < len(self.commands) else None, timeout_s)

    async def reply(self, seq: int, result) -> None:
        self._alive = time.monotonic()
        self.replies.setdefault(seq, result)  # a restarted worker's repeat reply does not overwrite
        self._wake()

    async def result(self, seq: int, timeout_s: float):
        return await self._wait(lambda: self.replies.get(seq), timeout_s)

    async def done(self, seq: int) -> None:
        """The driver has command `seq`'s reply: drop the reply (a full weights copy) and what
        answered commands carried (datasets), which the mailbox would otherwise keep alive in
        the object store for the whole run. A command stays as a tombstone, so a worker
        restarted from a checkpoint still counts its way through the sequence."""
        self.replies[seq] = Answered("reply", -1)  # a late repeat reply from a restarted worker is not kept
        # The newest answered train command keeps its dataset until the next one is answered:
        # Ray Train registers a reported checkpoint a moment after report() returns, so workers
        # restarted in that moment resume from the previous checkpoint and must retrain it.
        newest_train = max((i for i in range(seq + 1) if self.commands[i].op == "train"), default=None)
        for i in range(seq + 1):
            cmd = self.commands[i]
            if i != newest_train and not isinstance(cmd, Answered):
                self.commands[i] = Answered(cmd.op, cmd.iteration)

    async def held(self) -> dict:
        """What the mailbox still holds (for tests): commands with their payload, and replies."""
        return {"commands": sum(not isinstance(c, Answered) for c in self.commands),
                "replies": sum(not isinstance(r, Answered) for r in self.replies.values())}

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


def online_loop_per_worker(config: dict) -> None:
    """Ray Train entry point of the online trainer; see the module docstring."""
    import ray

    from raydpo.cluster import pin_cpus

    spec = TrainSpec.from_dict(config["spec"])
    mailbox = config["mailbox"]
    pin_cpus(config.get("cpu_ids"), "trainer")
    torch.set_num_threads(max(1, int(config.get("cpus_per_worker", 1))))  # see raydpo.train.staged
    torch.manual_seed(spec.seed)
    with resume_directory(spec) as resume_dir:
        learner = Learner(spec, config, total_steps=1 << 30, resume_dir=resume_dir)
    _warm_up(learner.rank)
    state = _WorkerState(learner, config.get("fault") or {})
    if learner.rank == 0:
        state.log = MetricsLog(spec.run_dir, total=None, initial=state.step, prefix=spec.metrics_prefix)
    seq, busy = 0, _start_heartbeat(mailbox)
    while True:
        cmd = ray.get(mailbox.next.remote(seq, 30.0))
        if cmd is None:
            continue  # the driver is sampling, judging or evaluating
        if isinstance(cmd, StopRequest):
            break
        busy.set()
        reply = state.handle(cmd)
        if reply is not None and learner.rank == 0:
            ray.get(mailbox.reply.remote(seq, reply))
        busy.clear()
        seq += 1
    if state.log:
        state.log.close()


class _WorkerState:
    """What one worker knows between commands: its learner, the newest iteration trained
    (from the checkpoint it started from, then its own), the global step."""

    def __init__(self, learner: Learner, fault: dict):
        self.learner, self.fault = learner, fault  # fault: tests only, {"die_after_report": i, "marker": path}
        self.nccl = None  # sampler.weight_transport=nccl: the trainer's side of the transfer group
        self.done_iteration = learner.state.get("iteration", 0)
        self.step = learner.state.get("step", 0)
        self.log: MetricsLog | None = None

    def handle(self, cmd):
        """The reply to `cmd`, or None when there is nothing to answer (already answered)."""
        if isinstance(cmd, Answered):
            if cmd.op == "train" and cmd.iteration > self.done_iteration:
                raise TrainerError(f"restarted from the checkpoint of iteration {self.done_iteration}, but iteration "
                                   f"{cmd.iteration} was already answered and its data released: the "
                                   f"checkpoint it reported is missing; resume the run with --resume")
            return None  # answered before this worker (re)started; its payload is gone
        if isinstance(cmd, KLRequest):
            t0 = time.perf_counter()
            kl, n = _kl(self.learner, cmd)
            return KLResult(kl, n, time.perf_counter() - t0)
        if not isinstance(cmd, TrainRequest):
            raise ValueError(f"online trainer: unknown command {cmd!r}")
        if cmd.iteration == self.done_iteration and "reply" in self.learner.state:
            # In the checkpoint this worker restarted from, but never answered: the rank died
            # between ray.train.report and its reply. Answer from the checkpoint, or the
            # driver would wait for a reply nobody sends.
            saved = self.learner.state["reply"]
            return TrainResult(**saved, weights=[None if cmd.engines else self._weights()], from_checkpoint=True)
        if cmd.iteration <= self.done_iteration:
            return None  # already in the checkpoint this worker restarted from, and answered
        return self._train(cmd)

    def _weights(self, engines: tuple = ()):
        """The policy's weights in the object store, in buckets (rank 0's `StoredWeights`;
        every rank must call: ZeRO-3 gathers a bucket at a time). With `engines`
        (sampler.weight_transport=nccl, GPU only, never run here) broadcast into them
        instead (`raydpo.train.nccl_sync`): None."""
        from raydpo.weights import put_weights

        spec = self.learner.spec
        if engines:
            if self.nccl is None:
                from raydpo.train.nccl_sync import NcclSender

                self.nccl = NcclSender(self.learner, spec.weight_bucket_mb << 20, spec.engine_ranks)
            self.nccl.send(tuple(engines))
            return None
        parts = self.learner.weight_buckets(spec.weight_bucket_mb << 20)
        try:
            return put_weights(parts) if self.learner.rank == 0 else None
        finally:  # ZeRO-3: every rank takes part in each bucket's gather, rank 0 after a failed put too
            for _ in parts:
                pass

    def _train(self, cmd: TrainRequest) -> TrainResult:
        learner, spec = self.learner, self.learner.spec
        t0 = time.perf_counter()
        if cmd.refresh_reference and learner.reference is not None and not spec.lora_r:
            full = learner.state_dict()  # every rank (ZeRO-3 gathers)
            learner.reference.load_state_dict(with_tied_head(full, tied_weight_keys(learner.reference)))
        rows = _read_rows(cmd.dataset)
        n_pairs = len(rows.get("prompt_ids", ()))
        timing = {"setup": time.perf_counter() - t0}
        t = time.perf_counter()
        # the reference is frozen for the iteration: score each pair once, not once per pass
        # (live, each rank scores its share of every step: rows x passes / world)
        if spec.reference_once and learner.reference is not None and n_pairs and cmd.passes >= learner.world:
            rows = _with_reference(learner, rows)
        timing["reference"] = time.perf_counter() - t
        t = time.perf_counter()
        last_pass: list[dict] = []
        for p in range(cmd.passes):
            last_pass = self._pass(rows, cmd.iteration, p)
        timing["passes"] = time.perf_counter() - t
        self.done_iteration = cmd.iteration
        keys = sorted({k for m in last_pass for k in m})
        mean = {k: sum(m[k] for m in last_pass) / len(last_pass) for k in keys} if last_pass else {}
        result = TrainResult(len(last_pass) * cmd.passes, n_pairs, mean, self.step, kept=dict(cmd.kept))
        t = time.perf_counter()
        weights = self._weights(cmd.engines)
        timing["weights"] = time.perf_counter() - t
        t = time.perf_counter()
        self._report(result)
        timing["checkpoint"] = time.perf_counter() - t
        result.weights, result.timing, result.seconds = [weights], timing, time.perf_counter() - t0
        return result

    def _pass(self, rows: dict, iteration: int, p: int) -> list[dict]:
        """One pass over the iteration's pairs; each step's metrics."""
        learner, spec = self.learner, self.learner.spec
        size, n = spec.batch_size * spec.bucket_window, len(rows.get("prompt_ids", ()))
        windows = ({k: v[s:s + size] for k, v in rows.items()} for s in range(0, n, size))
        seed = spec.seed + 1000 * iteration + p  # a new batch order each pass and iteration
        steps = []
        # a short tail batch is trained too (DDP): an iteration's few dozen pairs rarely
        # fill whole batches. DeepSpeed's fixed accumulation needs full ones.
        for gbatch in global_batches(windows, spec.batch_size, seed, drop_last=learner.engine is not None,
                                     length=learner.layout.length):
            if len(gbatch["prompt_ids"]) < learner.world:
                continue  # fewer rows than workers: nothing to split
            metrics = learner.step(gbatch)
            self.step += 1
            steps.append(metrics)
            if self.log:
                self.log.log(self.step, {**metrics, "iteration": iteration})
        return steps

    def _report(self, result: TrainResult) -> None:
        """Checkpoint ``iter-NNNNNN`` through ray.train.report; the reply rides in it, so a rank
        that dies after reporting is answered from it."""
        import ray.train

        state = {"iteration": self.done_iteration, "step": self.step, "mode": "online", "final": False,
                 "reply": result.saved()}
        with tempfile.TemporaryDirectory() as tmp:
            self.learner.save(Path(tmp), state)
            ckpt = ray.train.Checkpoint.from_directory(tmp) if self.learner.writes_checkpoint else None
            ray.train.report({"iteration": self.done_iteration, "step": self.step}, checkpoint=ckpt,
                             checkpoint_dir_name=f"iter-{self.done_iteration:06d}")
        fault = self.fault
        if fault.get("die_after_report") == self.done_iteration and self.learner.rank == 0 \
                and not Path(fault["marker"]).exists():
            Path(fault["marker"]).touch()  # once
            time.sleep(fault.get("after_s", 0))  # let Ray Train register the reported checkpoint
            os._exit(1)  # fault injection (tests): reported, never replied


def _warm_up(rank: int) -> None:
    """Pay, while the workers start, first calls that cost far more than later ones and would
    otherwise fall into iteration 1: this process's first read of a Ray Dataset (0.07 s measured
    on 2 cores) and, on rank 0 (the one that writes the HF folder), its first HF save
    (`warm_up_save`)."""
    import ray.data

    _read_rows(ray.data.from_items([{"x": 0}]))
    if rank == 0:
        warm_up_save()


def _read_rows(dataset) -> dict[str, list]:
    """An iteration's training rows, read from Ray Data once for all its passes: a pass that
    iterated the Dataset itself paid an execution each time, a quarter of the tiny model's
    training time on 2 cores (py-spy). An iteration holds tens to thousands of pairs."""
    rows: dict[str, list] = {}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for k, v in batch.items():
            rows.setdefault(k, []).extend(v)
    return rows


@torch.no_grad()
def _with_reference(learner: Learner, rows: dict, batch: int | None = None) -> dict:
    """`rows` with the frozen reference's log-probs (REFERENCE_COLUMNS), which the steps then
    read instead of running the reference. The same model and precision as a step's live
    reference, in forward passes of `batch` pairs of similar length: by default a training
    micro-batch, whose logits the device holds in training already (a vocabulary of 128k
    makes the logits of 64 long pairs tens of GB)."""
    batch = batch or learner.spec.micro_batch_size
    n = len(rows["prompt_ids"])
    order = sorted(range(n), key=lambda i: learner.layout.length(rows, i))
    chosen, rejected = [0.0] * n, [0.0] * n
    for s in range(0, n, batch):
        idx = order[s:s + batch]
        part = {k: [rows[k][i] for i in idx] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        mb = {k: v.to(learner.device) for k, v in learner.layout.collate(part, learner.pad_id).items()}
        with learner.autocast:
            rc, rr = frozen_logps(learner.reference, mb)
        for i, c, r in zip(idx, rc.float().tolist(), rr.float().tolist()):
            chosen[i], rejected[i] = c, r
    return {**rows, REFERENCE_COLUMNS[0]: chosen, REFERENCE_COLUMNS[1]: rejected}


@torch.no_grad()
def _kl(trainer: Learner, req: KLRequest, batch: int = 64) -> tuple[float, int]:
    """Mean over responses y ~ pi of log pi(y|x) - log pi_ref(y|x): a Monte-Carlo
    estimate of KL(pi || pi_ref) in nats per response, when the responses were
    sampled from the current policy at temperature 1."""
    if trainer.reference is None:
        return float("nan"), 0
    model = trainer.unwrapped
    was_training = model.training
    model.eval()
    total, n = 0.0, len(req.prompt_ids)
    for s in range(0, n, batch):
        # chosen = rejected = y: the collated batch's first half is what we score
        part = {"prompt_ids": req.prompt_ids[s:s + batch], "chosen_ids": req.response_ids[s:s + batch],
                "rejected_ids": req.response_ids[s:s + batch]}
        mb = {k: v.to(trainer.device) for k, v in collate_pairs(part, trainer.pad_id).items()}
        ref = frozen_logps(trainer.reference, mb)[0]
        if req.policy_logps is None:
            pol = forward_logps(model, mb).chunk(2)[0]
        else:  # the sampler's: the version that produced y, whatever this worker holds now
            pol = torch.tensor(req.policy_logps[s:s + batch], dtype=ref.dtype, device=ref.device)
        total += float((pol - ref).sum())
    model.train(was_training)
    return total / max(1, n), n
