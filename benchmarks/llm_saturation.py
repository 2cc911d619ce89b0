"""LLM saturation: 1,000 concurrent agent calls through InferenceClient against the simulator.

Runs the simulator in a subprocess (so the client's CPU time is measured alone), sends worker
prompts built with the shared-prefix layout, and prints, as medians over the repeats:

- achieved requests/s as a ratio of the simulator's theoretical capacity for the work it did
  (the rate if every engine step had run a full batch of max_num_seqs);
- the prefix-cache hit rate (tokens) of the worker prompts;
- client CPU microseconds per request.

    PYTHONPATH=. python benchmarks/llm_saturation.py [--requests 1000] [--repeats 3] [--time-scale 1.0]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import anyio
import httpx

from orchestrator.simulator import LatencyModel
from protocol.inference import InferenceClient, InferenceSettings
from protocol.prompts import build_messages
from protocol.roles import ROLE_WORKER

SYSTEM = (
    "You are one worker in a multi-agent system. A manager splits a goal into tasks; you complete one task, "
    "exactly as instructed, and a verifier checks your answer against the task's spec. Be concrete, cite the "
    "facts you rely on, keep to the requested format, and never invent sources. "
) * 6
SPEC = {"description": "Answer in three numbered points and a one-line conclusion.", "max_words": 150,
        "format": "numbered list", "language": "en"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_sim(port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "orchestrator.simulator", "--port", str(port), "--max-num-seqs",
           str(args.max_num_seqs), "--time-scale", str(args.time_scale), "--sim-admin"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


async def wait_ready(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http:
        for _ in range(200):
            try:
                if (await http.get("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await anyio.sleep(0.05)
    raise RuntimeError("simulator did not start")


async def one_run(url: str, args: argparse.Namespace) -> dict[str, float]:
    settings = InferenceSettings(url=url, model="sim-model", max_concurrency=args.concurrency, timeout=120)
    async with InferenceClient(settings) as client:
        await client.check()
        await client.warm(build_messages(system=SYSTEM, role=ROLE_WORKER, spec=SPEC, variable="warm-up"))
        before: dict[str, Any] = (await client.http.get("/_sim/state")).json()

        async def agent(i: int) -> None:
            messages = build_messages(system=SYSTEM, role=ROLE_WORKER, spec=SPEC,
                                      variable=f"Instruction: describe option {i} for the migration plan of team {i % 37}")
            await client.chat(messages, max_tokens=args.max_tokens, run_id="bench", task_id=str(i))

        cpu0, t0 = time.process_time(), time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(args.requests):
                tg.start_soon(agent, i)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        after: dict[str, Any] = (await client.http.get("/_sim/state")).json()

    def delta(key: str) -> float:
        return float(after[key]) - float(before[key])

    latency = LatencyModel.model_validate(after["config"]["latency"])
    capacity = latency.capacity(requests=int(delta("completed")), output_tokens=int(delta("generation_tokens")),
                                prefill_tokens=int(delta("prefill_computed_tokens")),
                                max_num_seqs=args.max_num_seqs) / args.time_scale
    return {
        "wall_s": wall,
        "achieved_rps": args.requests / wall,
        "capacity_rps": capacity,
        "ratio": args.requests / wall / capacity,
        "hit_rate": delta("prefix_cache_hits") / delta("prefix_cache_queries"),
        "cpu_us_per_request": cpu / args.requests * 1e6,
        "max_batch": float(after["max_batch_size"]),
        "mean_batch": (after["mean_batch_size"] * after["steps"] - before["mean_batch_size"] * before["steps"])
        / max(delta("steps"), 1),
        "engine_busy_s": delta("busy_virtual_s") * args.time_scale,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=384, help="client limiter: max_num_seqs plus a small queue")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--time-scale", type=float, default=1.0, help="1.0 = the modelled H100 in real time")
    args = p.parse_args()
    runs = []
    for _ in range(args.repeats):
        port = free_port()
        proc = start_sim(port, args)
        try:
            url = f"http://127.0.0.1:{port}"
            anyio.run(wait_ready, url)
            runs.append(anyio.run(one_run, url, args))
        finally:
            proc.terminate()
            proc.wait(10)
        r = runs[-1]
        print(f"run {len(runs)}: {r['achieved_rps']:.1f} req/s of {r['capacity_rps']:.1f} capacity "
              f"(ratio {r['ratio']:.3f}), hit rate {r['hit_rate']:.3f}, client {r['cpu_us_per_request']:.0f} us/req, "
              f"batch max {r['max_batch']:.0f} mean {r['mean_batch']:.0f}, engine busy {r['engine_busy_s']:.2f} s "
              f"of wall {r['wall_s']:.2f} s")
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"\nLLM saturation: {args.requests} concurrent calls, max_num_seqs {args.max_num_seqs}, "
          f"time_scale {args.time_scale}, medians of {len(runs)} runs")
    print(f"  throughput / theoretical capacity : {med['ratio']:.3f}   (target >= 0.95; whole run incl. ramp-up)")
    print(f"  prefix-cache hit rate (worker)    : {med['hit_rate']:.3f}   (target >= 0.8)")
    print(f"  client CPU per request            : {med['cpu_us_per_request']:.0f} us")
    print(f"  achieved / capacity req/s          : {med['achieved_rps']:.1f} / {med['capacity_rps']:.1f}")


if __name__ == "__main__":
    main()
