"""Simulation results in `ridgeline bench serve`'s terms: the same metric code, table and JSON layout,
plus what only a simulator knows (per-replica utilisation, prefix-cache hits, preemptions, KV
transfers). Inter-token latencies are not kept (100k requests x hundreds of tokens), so the
ITL section is left out; TPOT is (E2E - TTFT) / (output tokens - 1) as in bench serve.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..bench.client import plot_cdfs as bench_plot_cdfs
from ..bench.metrics import BenchMetrics, RequestRecord, compute_metrics, format_table, meets_slos
from .simulator import SimResult


def records(result: SimResult) -> list[RequestRecord]:
    return [RequestRecord(success=True, prompt_tokens=p, output_tokens=o, ttft=f - s, latency=e - s, start_time=s)
            for s, f, e, p, o in zip(result.sent, result.first_token, result.finish, result.prompt_len,
                                     result.output_len)]


def slo_attainment(recs: list[RequestRecord], slos_ms: dict[str, float]) -> float | None:
    """Fraction of requests meeting every SLO (DistServe's attainment); None without SLOs."""
    if not slos_ms:
        return None
    return sum(meets_slos(r, slos_ms) for r in recs) / max(1, len(recs))


def summarize(result: SimResult, slos_ms: dict[str, float] | None = None,
              percentiles: tuple[float, ...] = (50, 90, 99)) -> tuple[BenchMetrics, dict[str, Any]]:
    """(bench metrics, the JSON-ready summary)."""
    recs = records(result)
    metrics = compute_metrics(recs, max(result.makespan_s, 1e-12), slos_ms or {}, percentiles)
    m = metrics.to_dict()
    m.pop("itl_ms", None)
    makespan = max(result.makespan_s, 1e-12)
    replicas = []
    for i, (role, st) in enumerate(zip(result.replica_roles, result.replica_stats)):
        replicas.append({"replica": i, "role": role, "requests": st.requests, "steps": st.steps,
                         "busy_s": st.busy_s, "utilization": st.busy_s / makespan,
                         "prefill_tokens": st.prefill_tokens, "decode_tokens": st.decode_tokens,
                         "preemptions": st.preemptions, "max_running": st.max_running,
                         "prefix_cache_hit_rate": st.cache_hits / st.cache_queries if st.cache_queries else 0.0})
    queries = sum(st.cache_queries for st in result.replica_stats)
    hits = sum(st.cache_hits for st in result.replica_stats)
    util = {role: float(np.mean([r["utilization"] for r in replicas if r["role"] == role]))
            for role in dict.fromkeys(result.replica_roles)}
    summary: dict[str, Any] = {
        "metrics": m,
        "slo_attainment": slo_attainment(recs, metrics.slos_ms),
        "utilization_mean": float(np.mean([r["utilization"] for r in replicas])),
        "utilization_by_role": util,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "preemptions": int(sum(result.preemptions)),
        "kv_blocks_per_replica": result.kv_blocks,
        "steps": int(sum(st.steps for st in result.replica_stats)),
        "max_in_flight": result.max_in_flight,
        "sim_wall_s": result.wall_s,
        "replicas": replicas,
    }
    if result.config.policy == "disaggregated":
        tx = np.asarray([t for t, o in zip(result.transfer_s, result.output_len) if o > 1], dtype=np.float64) * 1000
        summary["kv_transfer_ms"] = ({"mean": float(tx.mean()), "median": float(np.median(tx)),
                                      "p99": float(np.percentile(tx, 99))} if tx.size else None)
    return metrics, summary


def format_report(result: SimResult, metrics: BenchMetrics, summary: dict[str, Any]) -> str:
    """bench serve's table (without ITL) followed by the simulator's own rows."""
    cfg = result.config
    title = (f"Simulation: {cfg.policy}, {cfg.replicas} x {cfg.hardware}"
             + (f" ({cfg.num_prefill} prefill + {cfg.replicas - cfg.num_prefill} decode)"
                if cfg.policy == "disaggregated" else ""))
    lines, skip = [], False
    for line in format_table(metrics, title).splitlines():
        if line.startswith("-") and "Inter-token Latency" in line:
            skip = True
            continue
        if skip and line.startswith("-"):
            skip = False
        if not skip:
            lines.append(line)
    rows = []
    if summary["slo_attainment"] is not None:
        rows.append(("SLO attainment (%):", f"{100 * summary['slo_attainment']:.2f}"))
    for role, u in summary["utilization_by_role"].items():
        rows.append((f"Mean utilization, {role} (%):", f"{100 * u:.1f}"))
    rows += [("Prefix cache hit rate (%):", f"{100 * summary['prefix_cache_hit_rate']:.1f}"),
             ("Preemptions:", f"{summary['preemptions']}"),
             ("KV blocks per replica:", f"{summary['kv_blocks_per_replica']}"),
             ("Engine steps simulated:", f"{summary['steps']}")]
    if summary.get("kv_transfer_ms"):
        rows.append(("Mean KV transfer incl. queue (ms):", f"{summary['kv_transfer_ms']['mean']:.2f}"))
    rows.append(("Simulator wall time (s):", f"{summary['sim_wall_s']:.2f}"))
    width = 50
    out = lines[:-1] + [f"{' Simulator ':-^{width}}"] + [f"{k:<40}{v:>10}" for k, v in rows] + [lines[-1]]
    return "\n".join(out)


def plot_cdfs(result: SimResult, path: str, title: str | None = None) -> None:
    """Empirical CDFs of TTFT, TPOT and E2E latency (ms): the bench's plot of the simulated records."""
    cfg = result.config
    bench_plot_cdfs(records(result), path, title or f"simulated {cfg.policy} on {cfg.replicas} x {cfg.hardware}")


def json_ready(obj: Any) -> Any:
    """inf/nan as strings so the JSON stays standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj
