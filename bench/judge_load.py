"""Bounded load test of the rule judge on Ray Serve, batching on vs off, in one run.

    python bench/judge_load.py [--clients 32] [--requests 2000] [--time-limit 120]

Starts a local Ray and Serve on 127.0.0.1 (a free port), deploys the rule
judge with @serve.batch max_batch_size 64 and then 1 (batching off), and sends
`--requests` POST /v1/score requests (one item each) from `--clients`
concurrent asyncio clients. Traffic goes only to 127.0.0.1; the run stops at
the request count or the time limit, whichever comes first. Prints throughput,
p50/p99 latency and errors for each, and the ratio batched / unbatched.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import time

from common import start_local_ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, clients: int, requests: int, time_limit: float) -> dict:
    import httpx

    from raydpo.tasks import style

    prompts = style.split_prompts()[1]
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.monotonic() + time_limit

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal errors, sent
        while sent < requests and time.monotonic() < deadline:
            i = sent
            sent += 1
            body = {"items": [{"prompt": prompts[i % len(prompts)], "response": f" word{i % 7} please."}]}
            t = time.perf_counter()
            try:
                r = await c.post(url, json=body)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t)
            errors += not ok

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=clients)) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"n": len(latencies), "rps": len(latencies) / wall, "p50": statistics.median(latencies) * 1e3,
            "p99": latencies[int(0.99 * (len(latencies) - 1))] * 1e3, "errors": errors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--time-limit", type=float, default=120.0)
    args = ap.parse_args()

    import ray
    from ray import serve

    from raydpo.judge.apps import build_app

    start_local_ray()
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = {}
    for name, batch in (("batched (64)", 64), ("unbatched (1)", 1)):
        serve.run(build_app({"max_batch_size": batch}), name="judge", route_prefix="/judge")
        url = f"http://127.0.0.1:{port}/judge/v1/score"
        asyncio.run(load(url, args.clients, 64, 30))  # warm-up
        results[name] = asyncio.run(load(url, args.clients, args.requests, args.time_limit))
        serve.delete("judge")
    serve.shutdown()
    ray.shutdown()
    for name, r in results.items():
        print(f"{name:<14} {r['n']:5d} requests  {r['rps']:7.1f} req/s  p50 {r['p50']:6.1f} ms  "
              f"p99 {r['p99']:6.1f} ms  errors {r['errors']}")
    b, u = results["batched (64)"], results["unbatched (1)"]
    print(f"RESULT clients={args.clients} requests={b['n']} batched_rps={b['rps']:.1f} unbatched_rps={u['rps']:.1f} "
          f"ratio={b['rps'] / u['rps']:.2f} batched_p50_ms={b['p50']:.1f} batched_p99_ms={b['p99']:.1f} "
          f"errors={b['errors'] + u['errors']}")


if __name__ == "__main__":
    main()
