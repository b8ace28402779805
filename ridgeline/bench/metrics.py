"""Serving-benchmark metrics as pure functions of per-request timing records.

Definitions follow vLLM's `benchmark_serving`:
- TTFT: send time to the first streamed chunk that carries text.
- TPOT: (E2E - TTFT) / (output tokens - 1), for requests with more than one output token.
- ITL: the gaps between successive text-carrying chunks (all requests pooled).
- E2E latency: send time to the last chunk.
- Throughputs divide totals over completed requests by the benchmark's wall time.
- Goodput: completed requests per second that met every SLO given (ttft, tpot, e2el; in ms).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

SLO_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class RequestRecord:
    """What the client measured for one request (seconds, relative to the request's send time)."""

    success: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0  # E2E
    itl: list[float] = field(default_factory=list)
    start_time: float = 0.0  # absolute send time (for plots and traces)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


@dataclass
class Distribution:
    mean: float
    median: float
    std: float
    percentiles: dict[str, float]  # "p99" -> value (ms)


@dataclass
class BenchMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # req/s
    output_throughput: float  # tok/s
    total_token_throughput: float  # tok/s
    max_concurrent_requests: int
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2el_ms: Distribution
    goodput: float | None = None  # req/s meeting every SLO; None without SLOs
    slos_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """['ttft:500', 'tpot:50'] -> {'ttft': 500.0, 'tpot': 50.0}; names and values are checked."""
    slos: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition(":")
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--slo must look like NAME:MS with NAME one of {', '.join(SLO_METRICS)}; got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--slo {name}: {value!r} is not a number of milliseconds") from None
        if ms <= 0:
            raise ValueError(f"--slo {name}: must be > 0 ms, got {value}")
        slos[name] = ms
    return slos


def distribution(values_s: list[float], percentiles: tuple[float, ...]) -> Distribution:
    """Summary in milliseconds; all zeros for an empty list (as vLLM reports it)."""
    if not values_s:
        return Distribution(0.0, 0.0, 0.0, {_pname(p): 0.0 for p in percentiles})
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    return Distribution(float(a.mean()), float(np.median(a)), float(a.std()),
                        {_pname(p): float(np.percentile(a, p)) for p in percentiles})


def _pname(p: float) -> str:
    return f"p{int(p)}" if float(p).is_integer() else f"p{p}"


def meets_slos(rec: RequestRecord, slos_ms: dict[str, float]) -> bool:
    if not rec.success:
        return False
    if "ttft" in slos_ms and rec.ttft * 1000 > slos_ms["ttft"]:
        return False
    if "tpot" in slos_ms and (rec.tpot or 0.0) * 1000 > slos_ms["tpot"]:
        return False
    if "e2el" in slos_ms and rec.latency * 1000 > slos_ms["e2el"]:
        return False
    return True


def max_concurrency_observed(records: list[RequestRecord]) -> int:
    """Most requests in flight at once, from their send and finish times."""
    events = []
    for r in records:
        if r.success:
            events.append((r.start_time, 1))
            events.append((r.start_time + r.latency, -1))
    events.sort(key=lambda e: (e[0], e[1]))  # a finish at t frees its slot before a start at t
    best = cur = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def compute_metrics(records: list[RequestRecord], duration_s: float, slos_ms: dict[str, float] | None = None,
                    percentiles: tuple[float, ...] = (50, 90, 99)) -> BenchMetrics:
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    ok = [r for r in records if r.success]
    in_tok = sum(r.prompt_tokens for r in ok)
    out_tok = sum(r.output_tokens for r in ok)
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    slos = dict(slos_ms or {})
    goodput = sum(meets_slos(r, slos) for r in ok) / duration_s if slos else None
    return BenchMetrics(
        completed=len(ok), failed=len(records) - len(ok), duration_s=duration_s,
        total_input_tokens=in_tok, total_output_tokens=out_tok,
        request_throughput=len(ok) / duration_s, output_throughput=out_tok / duration_s,
        total_token_throughput=(in_tok + out_tok) / duration_s,
        max_concurrent_requests=max_concurrency_observed(ok),
        ttft_ms=distribution([r.ttft for r in ok], percentiles),
        tpot_ms=distribution(tpots, percentiles),
        itl_ms=distribution([g for r in ok for g in r.itl], percentiles),
        e2el_ms=distribution([r.latency for r in ok], percentiles),
        goodput=goodput, slos_ms=slos)


def format_table(m: BenchMetrics, title: str = "Serving Benchmark Result") -> str:
    """The human-readable summary, laid out like vLLM's."""
    rows: list[tuple[str, str]] = [
        ("Successful requests:", f"{m.completed}"),
        ("Failed requests:", f"{m.failed}"),
        ("Benchmark duration (s):", f"{m.duration_s:.2f}"),
        ("Total input tokens:", f"{m.total_input_tokens}"),
        ("Total generated tokens:", f"{m.total_output_tokens}"),
        ("Request throughput (req/s):", f"{m.request_throughput:.2f}"),
    ]
    if m.goodput is not None:
        rows.append(("Request goodput (req/s):", f"{m.goodput:.2f}"))
    rows += [("Output token throughput (tok/s):", f"{m.output_throughput:.2f}"),
             ("Total token throughput (tok/s):", f"{m.total_token_throughput:.2f}"),
             ("Max concurrent requests:", f"{m.max_concurrent_requests}")]
    width = 50
    lines = [f"{' ' + title + ' ':=^{width}}"]
    lines += [f"{k:<40}{v:>10}" for k, v in rows]
    for name, label, d in (("ttft", "Time to First Token", m.ttft_ms), ("tpot", "Time per Output Token (excl. 1st token)", m.tpot_ms),
                           ("itl", "Inter-token Latency", m.itl_ms), ("e2el", "End-to-end Latency", m.e2el_ms)):
        lines.append(f"{label:-^{width}}")
        lines.append(f"{'Mean ' + name.upper() + ' (ms):':<40}{d.mean:>10.2f}")
        lines.append(f"{'Median ' + name.upper() + ' (ms):':<40}{d.median:>10.2f}")
        for p, v in d.percentiles.items():
            lines.append(f"{p.upper() + ' ' + name.upper() + ' (ms):':<40}{v:>10.2f}")
    lines.append("=" * width)
    return "\n".join(lines)
