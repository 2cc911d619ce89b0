"""LLM saturation: 1,000 concurrent agent calls through InferenceClient against the simulator.

Runs the simulator in a subprocess (so the client's CPU time is measured alone), sends worker
prompts built with the shared-prefix layout, and prints, as medians over the repeats:

- achieved requests/s as a ratio of the simulator's theoretical capacity for the work it did
  (the rate if every engine step had run a full batch of max_num_seqs);
- the prefix-cache hit rate (tokens) of the worker prompts;
- client CPU microseconds per request.

    PYTHONPATH=. python benchmarks/llm_saturation.py [--requests 1000] [--repeats 3] [--time-scale 1.0]

With ``--url`` it measures a real OpenAI-compatible server instead (vLLM, ``transformers serve
--continuous-batching``): the framework's token throughput beside a plain load generator's at the same
concurrency, each repeat running every arm of ``benchmarks/llm_load.py`` in a rotated order, and prints the
medians and each arm's ratio to the plain one::

    PYTHONPATH=. python benchmarks/llm_saturation.py --url http://127.0.0.1:8000 [--model NAME] \
        [--requests 1000] [--concurrency 256] [--max-tokens 128] [--arms plain,client,job]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_load import ARMS, RUNNERS, ArmResult, Workload, messages

from orchestrator.simulator import LatencyModel
from protocol.inference import InferenceClient, InferenceSettings


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
    settings = InferenceSettings(url=url, model="sim-model", max_concurrency=args.concurrency, timeout=120,
                                 http=args.http)
    async with InferenceClient(settings) as client:
        await client.check()
        await client.warm(messages(-1))
        before: dict[str, Any] = (await client.http.get("/_sim/state")).json()

        async def agent(i: int) -> None:
            await client.chat(messages(i), max_tokens=args.max_tokens, run_id="bench", task_id=str(i))

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
    p.add_argument("--url", help="measure this OpenAI-compatible server (no simulator): framework vs plain load")
    p.add_argument("--model", help="with --url: the model to ask (default: the first the server lists)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"with --url: which of {', '.join(ARMS)} to run")
    p.add_argument("--json", type=Path, help="with --url: also write every run and the medians to this file")
    p.add_argument("--http", default="auto", choices=("auto", "aiohttp", "httpx"),
                   help="InferenceSettings.http: the framework's HTTP client for completions")
    args = p.parse_args()
    if args.url:
        server_main(args)
        return
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


async def served_model(url: str) -> str:
    async with InferenceClient(InferenceSettings(url=url)) as client:
        return (await client.check()).model


def server_main(args: argparse.Namespace) -> None:
    """Every arm of ``llm_load`` once a repeat, in a rotated order; medians and ratios to ``plain``."""
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        raise SystemExit(f"--arms: unknown arm(s) {unknown or args.arms!r}; choose from {', '.join(ARMS)}")
    w = Workload(args.url, args.model or anyio.run(served_model, args.url), args.requests, args.concurrency,
                 args.max_tokens, args.http)
    print(f"{w.url} model {w.model}: {w.requests} calls, concurrency {w.concurrency}, max_tokens {w.max_tokens}, "
          f"framework's HTTP client {w.http}")
    runs: dict[str, list[ArmResult]] = {arm: [] for arm in arms}
    for repeat in range(args.repeats):
        turn = repeat % len(arms)
        for arm in arms[turn:] + arms[:turn]:
            r = anyio.run(RUNNERS[arm], w)
            runs[arm].append(r)
            print(f"repeat {repeat + 1} {arm:<6} {r.tokens_per_s:9.0f} tokens/s {r.requests_per_s:8.1f} req/s  "
                  f"client CPU {r.cpu_us_per_request:6.0f} us/req  wall {r.wall_s:6.2f} s  "
                  f"({r.completion_tokens} tokens)", flush=True)
        if args.json:  # kept as it grows, so a run stopped early still leaves its repeats
            args.json.write_text(json.dumps({"workload": vars(w), "runs": _runs_json(runs)}, indent=1))
    medians = {arm: {"tokens_per_s": statistics.median(r.tokens_per_s for r in rs),
                     "requests_per_s": statistics.median(r.requests_per_s for r in rs),
                     "cpu_us_per_request": statistics.median(r.cpu_us_per_request for r in rs)}
               for arm, rs in runs.items()}
    print(f"\nmedians of {args.repeats} repeats: arm, tokens/s, requests/s, client CPU us a request, "
          "tokens/s against plain (median of the repeats' ratios)")
    for arm, m in medians.items():
        ratio = ""
        if "plain" in runs and arm != "plain":
            m["ratio_to_plain"] = statistics.median(
                r.tokens_per_s / p.tokens_per_s for r, p in zip(runs[arm], runs["plain"], strict=True))
            ratio = f"{m['ratio_to_plain']:.3f}"
        print(f"  {arm:<6} {m['tokens_per_s']:9.0f} {m['requests_per_s']:8.1f} {m['cpu_us_per_request']:7.0f}  {ratio}")
    if args.json:
        args.json.write_text(json.dumps({"workload": vars(w), "medians": medians, "runs": _runs_json(runs)}, indent=1))


def _runs_json(runs: dict[str, list[ArmResult]]) -> dict[str, list[dict[str, Any]]]:
    return {arm: [vars(r) for r in rs] for arm, rs in runs.items()}


if __name__ == "__main__":
    main()
