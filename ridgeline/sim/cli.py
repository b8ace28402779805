"""`ridgeline simulate`: options and entry point (wired into ridgeline.cli as a subcommand)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone

from ..bench.client import add_dataset_arguments
from ..bench.metrics import parse_slos
from ..core.config import MIN_SAVED_TOKENS_CPU_KERNELS, MIN_SAVED_TOKENS_TORCH, HydragenConfig
from .config import POLICIES, SimConfig
from .report import format_report, json_ready, plot_cdfs, summarize
from .router import ROUTERS
from .simulator import simulate
from .workload import WorkloadSpec, build_workload

_HYDRAGEN = HydragenConfig()  # the engine's defaults


def add_arguments(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("engine and hardware")
    e.add_argument("--model", default=None,
                   help="checkpoint directory, GGUF or bare config.json whose architecture is simulated "
                        "(default: the default model, SmolLM2-135M)")
    e.add_argument("--hardware", default="local",
                   help="hardware spec: a registry name (h100-sxm, a100-80gb, ...), a saved spec such as 'local' "
                        "(from `ridgeline perf calibrate`) or a spec JSON path (default: local)")
    e.add_argument("--dtype", default="bfloat16", help="compute and weight dtype (default: bfloat16)")
    e.add_argument("--kv-dtype", default=None, help="KV-cache dtype (default: --dtype)")
    e.add_argument("--max-num-seqs", type=int, default=256, help="running sequences per replica (default: 256)")
    e.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget per step, the prefill chunk size (default: 2048)")
    e.add_argument("--block-size", type=int, default=16, help="KV block size in tokens (default: 16)")
    e.add_argument("--kv-cache-memory", default=None,
                   help="KV pool per replica, bytes or e.g. 2GiB (default: device memory left after weights)")
    e.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    e.add_argument("--disable-prefix-caching", action="store_true", help="no prefix-cache hits")
    e.add_argument("--disable-hydragen", action="store_true",
                   help="no shared-prefix (Hydragen) decode attention: every decode reads its whole context")
    e.add_argument("--hydragen-min-saved-tokens", type=int, default=MIN_SAVED_TOKENS_TORCH,
                   help="use a prefix of P tokens shared by g decodes if (g-1)*P >= this "
                        f"(default: {MIN_SAVED_TOKENS_TORCH}, the engine's with PyTorch attention, as on GPUs; "
                        f"the engine with its fused CPU kernels uses {MIN_SAVED_TOKENS_CPU_KERNELS})")
    e.add_argument("--hydragen-min-saved-fraction", type=float, default=_HYDRAGEN.min_saved_fraction,
                   help="and only if the shared prefixes save this fraction of the decodes' full KV blocks "
                        f"(default: {_HYDRAGEN.min_saved_fraction}, as the engine)")
    f = p.add_argument_group("fleet")
    f.add_argument("--replicas", type=int, default=1, help="engine replicas, one device each (default: 1)")
    f.add_argument("--policy", default="colocated", choices=POLICIES,
                   help="colocated: every replica prefills and decodes (chunked prefill); disaggregated: "
                        "prefill and decode pools with KV transfer (default: colocated)")
    f.add_argument("--prefill-replicas", type=int, default=None,
                   help="disaggregated: replicas in the prefill pool, the rest decode (default: half)")
    f.add_argument("--link-bandwidth", type=float, default=25.0,
                   help="disaggregated: GB/s of each prefill replica's link for KV transfers (default: 25)")
    f.add_argument("--link-latency", type=float, default=0.0, help="disaggregated: ms per transfer (default: 0)")
    f.add_argument("--router", default="least-loaded", choices=ROUTERS,
                   help="replica choice for an arriving request (default: least-loaded)")
    f.add_argument("--client-latency", type=float, default=0.0,
                   help="ms one way between clients and servers (HTTP path, output delivery); a closed-loop "
                        "client's next request then waits for the step in progress (default: 0)")
    d = p.add_argument_group("workload (as ridgeline bench serve)")
    d.add_argument("--num-requests", "--num-prompts", dest="num_requests", type=int, default=1000,
                   help="requests to simulate (default: 1000)")
    add_dataset_arguments(d, "tokens")
    d.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests per second; inf sends all at once (default: inf)")
    d.add_argument("--burstiness", type=float, default=1.0,
                   help="Gamma shape of inter-arrival times: 1 = Poisson (default: 1)")
    d.add_argument("--max-concurrency", type=int, default=None,
                   help="closed loop: requests in flight at most (default: no cap)")
    o = p.add_argument_group("output")
    o.add_argument("--slo", nargs="+", metavar="NAME:MS", help="goodput SLOs, e.g. --slo ttft:500 tpot:50 (e2el too)")
    o.add_argument("--percentiles", default="50,90,99", help="comma-separated percentiles (default: 50,90,99)")
    o.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    o.add_argument("--result-file", default=None, help="write the JSON result here too")
    o.add_argument("--plot", default=None, metavar="PNG", help="save latency CDFs (TTFT, TPOT, E2E) as a PNG")


def config_from_args(args: argparse.Namespace) -> tuple[SimConfig, WorkloadSpec]:
    cfg = SimConfig.from_kwargs(
        model=args.model, hardware=args.hardware, dtype=args.dtype, kv_dtype=args.kv_dtype,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, kv_cache_memory=args.kv_cache_memory,
        enable_prefix_caching=not args.disable_prefix_caching, enable_hydragen=not args.disable_hydragen,
        hydragen_min_saved_tokens=args.hydragen_min_saved_tokens,
        hydragen_min_saved_fraction=args.hydragen_min_saved_fraction, max_model_len=args.max_model_len,
        replicas=args.replicas, policy=args.policy, prefill_replicas=args.prefill_replicas,
        link_bandwidth=args.link_bandwidth, link_latency=args.link_latency, router=args.router,
        client_latency=args.client_latency)
    spec = WorkloadSpec(**{name: getattr(args, name) for name in WorkloadSpec.__dataclass_fields__})
    return cfg, spec


def parse_percentiles(text: str) -> tuple[float, ...]:
    try:
        ps = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--percentiles must be comma-separated numbers, got {text!r}") from None
    if not ps or not all(0 <= p <= 100 for p in ps):
        raise ValueError(f"--percentiles must be numbers in [0, 100], got {text!r}")
    return ps


def run_from_args(args: argparse.Namespace) -> int:
    percentiles = parse_percentiles(args.percentiles)
    slos = parse_slos(args.slo)
    cfg, spec = config_from_args(args)
    workload = build_workload(spec)
    result = simulate(cfg, workload)
    metrics, summary = summarize(result, slos, percentiles)
    doc = json_ready({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "settings": {**cfg.settings(), "num_prefill_replicas": cfg.num_prefill, **vars(spec)},
                      **summary})
    if args.json:
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(result, metrics, summary))
    if args.result_file:
        with open(args.result_file, "w") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
    if args.plot:
        plot_cdfs(result, args.plot)
    return 0
