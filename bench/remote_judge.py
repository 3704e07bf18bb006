"""The remote judge's throughput under a hosted API's faults: concurrency 32 against 1, in one run.

    python bench/remote_judge.py [--items 160] [--latency-ms 200] [--p429 0.05]

Builds the tiny model, starts `vllm serve` on it (127.0.0.1, a free port) and puts the
test suite's fault-injecting proxy in front: every request waits `--latency-ms`, and
`--p429` of them get a 429 with Retry-After. The remote judge (`raydpo.judge.remote`,
the code the Serve replicas run) then judges `--items` pairs in both orders, once with
judge.remote.max_concurrency=1 (the baseline, on the first `--items`/8 pairs) and once
with 32. Nothing leaves 127.0.0.1.

    lost        pairs without a verdict
    duplicated  upstream answers beyond one per request body (an order paid for twice)
    retries     counted by the judge; checked against the 429s the proxy sent
    p50/p99_ms  time from asking to answer, per request, at concurrency 32

Ends with `RESULT requests=... ratio=... lost=... duplicated=... retries=... p50_ms=... p99_ms=...`,
ratio being pairs per second at 32 over pairs per second at 1.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers: the proxy and `vllm serve`

from raydpo.judge.remote import RemoteJudgeCore, RemoteSettings  # noqa: E402
from raydpo.judge.rules import DEFAULT_TEMPLATE  # noqa: E402


def items(n: int) -> list[tuple[str, str, str]]:
    from raydpo.tasks import style

    prompts = style.split_prompts()[1]
    return [(prompts[i % len(prompts)], f"a short answer number {i}", f"another answer, {i} words long")
            for i in range(n)]


def run(url: str, pairs, concurrency: int) -> tuple[list, RemoteJudgeCore, float, list[float]]:
    s = RemoteSettings(base_url=url + "/v1", model="judge", api="completions", api_key_env=None,
                       template=DEFAULT_TEMPLATE, max_new_tokens=4, max_concurrency=concurrency, max_retries=8)

    async def go():
        core = RemoteJudgeCore(s, None)
        latencies: list[float] = []
        post = core._post

        async def timed(text, attempt):  # time per request, as sent (retries are separate requests)
            t = time.perf_counter()
            try:
                return await post(text, attempt)
            finally:
                latencies.append(time.perf_counter() - t)

        core._post = timed
        t = time.perf_counter()
        verdicts = await asyncio.gather(*(core.compare(*p) for p in pairs), return_exceptions=True)
        return verdicts, core, time.perf_counter() - t, latencies

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=160)
    ap.add_argument("--latency-ms", type=float, default=200)
    ap.add_argument("--p429", type=float, default=0.05)
    a = ap.parse_args()

    from raydpo.tasks import style
    from raydpo.tiny_model import build_tiny_model
    from tests.helpers.fault_proxy import FaultProxy, Faults
    from tests.helpers.vllm_server import vllm_server

    work = Path(tempfile.mkdtemp(prefix="raydpo-remote-judge-"))
    model = build_tiny_model(style.corpus(seed=0, count=2000), work / "model", seed=0)
    print("[bench] starting vllm serve on the tiny model ...", flush=True)
    with vllm_server(model, work / "vllm.log") as upstream:
        faults = Faults(latency_s=a.latency_ms / 1000, p429=a.p429, retry_after="0.2")
        rows = []
        for concurrency, n in ((1, max(8, a.items // 8)), (32, a.items)):
            with FaultProxy(upstream, faults, seed=concurrency) as proxy:
                pairs = items(n)
                verdicts, core, wall, lat = run(proxy.url, pairs, concurrency)
            ok = Counter(e.body_sha for e in proxy.log if e.fault == "ok")
            lost = sum(isinstance(v, BaseException) for v in verdicts)
            rows.append(dict(concurrency=concurrency, pairs=n, wall=wall, rate=(n - lost) / wall, lost=lost,
                             duplicated=sum(c - 1 for c in ok.values()), retries=core.counts["retries"],
                             injected=proxy.count("429"), requests=len(proxy.log),
                             p50=statistics.median(lat) * 1000, p99=sorted(lat)[int(0.99 * (len(lat) - 1))] * 1000))
            print(f"[bench] concurrency {concurrency:>2}: {n} pairs in {wall:.1f} s ({rows[-1]['rate']:.1f}/s), "
                  f"{rows[-1]['requests']} requests, {rows[-1]['injected']} 429s, {rows[-1]['retries']} retries",
                  flush=True)
    print(f"\n{'concurrency':>11} {'pairs':>6} {'pairs/s':>8} {'requests':>8} {'429s':>5} {'retries':>7} "
          f"{'lost':>4} {'dup':>4} {'p50 ms':>7} {'p99 ms':>7}")
    for r in rows:
        print(f"{r['concurrency']:>11} {r['pairs']:>6} {r['rate']:>8.1f} {r['requests']:>8} {r['injected']:>5} "
              f"{r['retries']:>7} {r['lost']:>4} {r['duplicated']:>4} {r['p50']:>7.0f} {r['p99']:>7.0f}")
    one, many = rows
    assert many["retries"] == many["injected"], "every injected 429 must cost exactly one counted retry"
    print(f"RESULT requests={many['requests']} ratio={many['rate'] / one['rate']:.2f} "
          f"lost={one['lost'] + many['lost']} duplicated={one['duplicated'] + many['duplicated']} "
          f"retries={many['retries']} p50_ms={many['p50']:.0f} p99_ms={many['p99']:.0f}")


if __name__ == "__main__":
    main()
