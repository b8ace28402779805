"""Simulator validation: the real single-engine `ridgeline bench serve` runs (prefix-repetition,
1 / 8 / 32 concurrent clients) against `ridgeline simulate` of the same workload on one replica
of this machine's calibrated spec. Prints measured and simulated mean TTFT, mean TPOT and output
throughput with the relative errors.

    .venv/bin/ridgeline perf calibrate          # once: saves the spec `local`
    .venv/bin/python benchmarks/validate_simulator.py [--rounds 3] [--hardware local]

Each round starts the server, sends one warm-up request, runs the three client counts with
new seeds (so every round's prefixes are new to the prefix cache), and stops the server. The
measured figure is the median over rounds; the simulation uses the same seeds.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from ridgeline.bench.metrics import compute_metrics
from ridgeline.core.config import MIN_SAVED_TOKENS_CPU_KERNELS, MIN_SAVED_TOKENS_TORCH
from ridgeline.kernels import load_cpu_kernels
from ridgeline.sim import SimConfig, WorkloadSpec, build_workload, records, simulate

RIDGELINE = [sys.executable, "-m", "ridgeline.cli"]
CASES = ((1, 12), (8, 32), (32, 64))  # (concurrency, prompts)
WORKLOAD = dict(dataset="prefix-repetition", prefix_repetition_prefix_len=256, prefix_repetition_suffix_len=32,
                prefix_repetition_num_prefixes=4, prefix_repetition_output_len=64)


def _measure(port: int, concurrency: int, prompts: int, seed: int, out: Path) -> dict:
    cmd = RIDGELINE + ["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--dataset",
                       "prefix-repetition", "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
                       "--prefix-repetition-prefix-len", "256", "--prefix-repetition-suffix-len", "32",
                       "--prefix-repetition-num-prefixes", "4", "--prefix-repetition-output-len", "64",
                       "--ignore-eos", "--seed", str(seed), "--result-file", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())["metrics"]


def _serve(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(RIDGELINE + ["serve", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                           json={"prompt": "warm up", "max_tokens": 8}, timeout=60)
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


def _simulate(hardware: str, concurrency: int, prompts: int, seed: int, client_latency: float) -> dict:
    # the server's engine picks Hydragen's break-even by its decode attention; the simulation follows it
    min_saved = MIN_SAVED_TOKENS_CPU_KERNELS if load_cpu_kernels() is not None else MIN_SAVED_TOKENS_TORCH
    cfg = SimConfig.from_kwargs(hardware=hardware, kv_cache_memory="2GiB", client_latency=client_latency,
                                hydragen_min_saved_tokens=min_saved)
    spec = WorkloadSpec(num_requests=prompts, seed=seed, max_concurrency=concurrency, **WORKLOAD)
    result = simulate(cfg, build_workload(spec))
    return compute_metrics(records(result), result.makespan_s).to_dict()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hardware", default="local")
    ap.add_argument("--port", type=int, default=8137)
    # One client on an idle server: mean TTFT 62.2 ms at the client, 57.1 ms from add_request to the
    # first token in the engine, 0.7 ms to hand it to the event loop: ~4.5 ms of HTTP path both ways.
    ap.add_argument("--client-latency", type=float, default=2.2, help="ms one way (default: 2.2, measured)")
    args = ap.parse_args()
    keys = (("mean TTFT ms", lambda m: m["ttft_ms"]["mean"]), ("mean TPOT ms", lambda m: m["tpot_ms"]["mean"]),
            ("output tok/s", lambda m: m["output_throughput"]))
    measured = {c: {k: [] for k, _ in keys} for c, _ in CASES}
    simulated = {c: {k: [] for k, _ in keys} for c, _ in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(1, args.rounds + 1):
            proc = _serve(args.port)
            try:
                for c, n in CASES:
                    seed = r * 100 + c
                    m = _measure(args.port, c, n, seed, Path(tmp) / f"c{c}_r{r}.json")
                    s = _simulate(args.hardware, c, n, seed, args.client_latency)
                    for k, get in keys:
                        measured[c][k].append(get(m))
                        simulated[c][k].append(get(s))
                    print(f"round {r} concurrency {c}: measured " +
                          ", ".join(f"{k} {get(m):.1f}" for k, get in keys), flush=True)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    print("\n| clients | metric | measured | simulated | error |")
    print("|---|---|---|---|---|")
    errors = []
    for c, _ in CASES:
        for k, _ in keys:
            meas, sim = statistics.median(measured[c][k]), statistics.median(simulated[c][k])
            err = (sim - meas) / meas
            errors.append(abs(err))
            print(f"| {c} | {k} | {meas:.1f} | {sim:.1f} | {100 * err:+.1f}% |")
    print(f"\nmean absolute error {100 * statistics.fmean(errors):.1f}%, max {100 * max(errors):.1f}% "
          f"(hardware spec {args.hardware!r}, {args.rounds} rounds)")


if __name__ == "__main__":
    main()
