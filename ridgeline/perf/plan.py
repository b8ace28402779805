"""`ridgeline plan`: serving figures for a model on a device before anyone runs it there.

Steady state of B concurrent requests under continuous batching with chunked prefill: each
step decodes the running sequences (mean context prompt + output/2), and each request's
prompt is prefilled in token-budget chunks mixed into B - 1 other sequences' decode steps.
Over one request lifetime the batch runs O decode steps and absorbs B prefills, so
  TPOT = (O * t_decode(B) + B * extra_prefill) / O,  throughput = B / TPOT,
  TTFT = the prompt's chunked steps alongside B - 1 decodes (no queueing: a closed loop at B).
`ridgeline simulate` gives distributions under real arrivals; this is the quick estimate.

With --speculative, also the predicted speedup of speculative decoding per batch size: the
engine's SpecPolicy rule (core/spec_policy.py) on this PerfModel's step times, at the
workload's mean context, for a given per-token acceptance rate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..core.spec_policy import speedup
from .ops import SeqWork, StepShape
from .predictor import PerfModel, StepPrediction

SPEC_BATCHES = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class PhaseReport:
    step_ms: float
    bound: str
    time_by_bound_ms: dict[str, float]
    top_ops: list[tuple[str, float, str]]  # (name, ms, bound) of the costliest operators

    @classmethod
    def of(cls, p: StepPrediction) -> "PhaseReport":
        ops = sorted(p.ops, key=lambda o: -o.time_s)[:4]
        return cls(round(p.total_s * 1e3, 3), p.bound,
                   {k: round(v * 1e3, 3) for k, v in p.time_by_bound().items()},
                   [(o.name, round(o.time_s * 1e3, 3), o.bound) for o in ops])


@dataclass
class Plan:
    batch: int
    ttft_ms: float
    tpot_ms: float
    tokens_per_s: float
    requests_per_s: float
    max_batch: int  # largest batch meeting the SLOs (and fitting in memory)
    memory_max_batch: int
    slo_met: bool
    prefill: PhaseReport
    decode: PhaseReport

    def to_dict(self) -> dict:
        return {"batch": self.batch, "ttft_ms": round(self.ttft_ms, 3), "tpot_ms": round(self.tpot_ms, 3),
                "tokens_per_s": round(self.tokens_per_s, 2), "requests_per_s": round(self.requests_per_s, 4),
                "max_batch": self.max_batch, "memory_max_batch": self.memory_max_batch, "slo_met": self.slo_met,
                "prefill": self.prefill.__dict__, "decode": self.decode.__dict__}


def steady_state(pm: PerfModel, batch: int, prompt_len: int, output_len: int) -> tuple[float, float]:
    """(TTFT, TPOT) in seconds for `batch` concurrent requests."""
    ctx = prompt_len + output_len // 2
    ttft = pm.prefill_time(prompt_len, decode_batch=batch - 1, decode_context=ctx)
    others = pm.decode_step_time(batch - 1, ctx) if batch > 1 else 0.0
    room = max(1, pm.max_num_batched_tokens - (batch - 1))
    chunks = -(-prompt_len // room)
    extra_prefill = ttft - chunks * others
    decode = pm.decode_step_time(batch, ctx)
    tpot = (output_len * decode + batch * extra_prefill) / output_len
    return ttft, tpot


def plan(pm: PerfModel, prompt_len: int, output_len: int, slo_ttft_ms: float | None = None,
         slo_tpot_ms: float | None = None, batch: int | None = None) -> Plan:
    for name, value in (("prompt_len", prompt_len), ("output_len", output_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if prompt_len + output_len > pm.model.max_position_embeddings:
        raise ValueError(f"prompt_len + output_len ({prompt_len + output_len}) exceeds the model's context "
                         f"length ({pm.model.max_position_embeddings})")
    for name, value in (("slo_ttft_ms", slo_ttft_ms), ("slo_tpot_ms", slo_tpot_ms)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    memory_max = pm.max_batch(prompt_len, output_len)
    if memory_max < 1:
        raise ValueError(f"the model does not fit: {pm.weight_bytes / 1e9:.1f} GB of weights plus the KV of one "
                         f"{prompt_len + output_len}-token sequence exceed {pm.hw.name}'s usable memory "
                         f"({pm.hw.memory_capacity * pm.hw.memory_utilization / 1e9:.1f} GB)")

    def meets(b: int) -> bool:
        ttft, tpot = steady_state(pm, b, prompt_len, output_len)
        return ((slo_ttft_ms is None or ttft * 1e3 <= slo_ttft_ms)
                and (slo_tpot_ms is None or tpot * 1e3 <= slo_tpot_ms))

    # TTFT and TPOT grow with the batch: binary search for the largest that meets both SLOs.
    hi = min(memory_max, pm.max_num_batched_tokens)
    if not meets(1):
        best = 0
    elif meets(hi):
        best = hi
    else:
        lo = 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if meets(mid) else (lo, mid)
        best = lo
    b = batch if batch is not None else max(best, 1)
    ttft, tpot = steady_state(pm, b, prompt_len, output_len)
    ctx = prompt_len + output_len // 2
    chunk = min(prompt_len, pm.max_num_batched_tokens)
    return Plan(
        batch=b, ttft_ms=ttft * 1e3, tpot_ms=tpot * 1e3, tokens_per_s=b / tpot,
        requests_per_s=b / (tpot * output_len), max_batch=best, memory_max_batch=memory_max,
        slo_met=b <= best if batch is not None else best > 0,
        prefill=PhaseReport.of(pm.predict(StepShape.prefill(chunk))),
        decode=PhaseReport.of(pm.predict(StepShape.decode(b, ctx))))


def format_plan(pm: PerfModel, p: Plan, prompt_len: int, output_len: int) -> str:
    hw = pm.hw
    lines = [
        f"model: {pm.model.architecture}, {pm.weight_bytes / 1e9:.2f} GB of {pm.weight_dtype} weights; "
        f"KV {pm.kv_bytes_per_token / 1024:.1f} KiB/token ({pm.kv_dtype})",
        f"hardware: {hw.name} ({hw.peak(pm.dtype) / 1e12:.3g} TFLOP/s {pm.dtype}, "
        f"{hw.memory_bandwidth / 1e9:.4g} GB/s, {hw.memory_capacity / 1e9:.4g} GB)"
        + (" [calibrated]" if hw.calibrated else ""),
        f"workload: prompt {prompt_len} tokens, output {output_len} tokens, batch {p.batch}",
        "",
        f"{'TTFT':<22}{p.ttft_ms:>12.2f} ms",
        f"{'TPOT':<22}{p.tpot_ms:>12.2f} ms",
        f"{'output tokens/s':<22}{p.tokens_per_s:>12.1f}",
        f"{'requests/s':<22}{p.requests_per_s:>12.3f}",
        f"{'max batch (SLOs)':<22}{p.max_batch:>12d}",
        f"{'max batch (memory)':<22}{p.memory_max_batch:>12d}",
        "",
    ]
    for name, phase in (("prefill", p.prefill), ("decode", p.decode)):
        tops = ", ".join(f"{n} {ms:.3g} ms ({b})" for n, ms, b in phase.top_ops)
        lines.append(f"{name} step {phase.step_ms:.3g} ms, {phase.bound}-bound; costliest: {tops}")
    return "\n".join(lines)


def plot_roofline(pm: PerfModel, p: Plan, prompt_len: int, output_len: int, path: str) -> None:
    """LLM-Viewer's picture: attainable FLOP/s against arithmetic intensity, with each operator
    of a prefill step and a decode step placed at its intensity and modelled rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hw = pm.hw
    peak, bw = hw.peak(pm.dtype), hw.memory_bandwidth
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [10 ** (i / 20) for i in range(-40, 101)]
    ax.loglog(xs, [min(peak, x * bw) for x in xs], "k-", label=f"roofline ({hw.name}, {pm.dtype})")
    ax.axvline(peak / bw, color="grey", ls=":", lw=1)
    ax.text(peak / bw, peak * 1.15, f" ridge {peak / bw:.0f} FLOP/B", color="grey", fontsize=8)
    ctx = prompt_len + output_len // 2
    steps = (("prefill", StepShape.prefill(min(prompt_len, pm.max_num_batched_tokens)), "tab:blue"),
             (f"decode (batch {p.batch})", StepShape.decode(p.batch, ctx), "tab:red"))
    for label, shape, color in steps:
        pred = pm.predict(shape)
        pts = [(o.intensity, o.flops / o.time_s, o.name) for o in pred.ops if o.flops > 0 and o.bytes > 0]
        ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], color=color, label=label, zorder=3)
        for x, y, name in pts:
            ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points", color=color)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("FLOP/s (attainable; points: modelled)")
    ax.set_title(f"{pm.model.architecture} on {hw.name}: prompt {prompt_len}, output {output_len}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class SpecRow:
    """Speculative decoding at one batch size: the k in 0..max_k with the most tokens/s (0: do
    not speculate, speedup 1) and the speedup of always proposing max_k."""
    batch: int
    step_ms: float  # the plain one-token decode step
    best_k: int
    speedup: float  # at best_k
    speedup_max_k: float  # proposing max_k every step (--no-speculative-adaptive)
    tokens_per_s: float  # decode tokens/s at best_k

    def to_dict(self) -> dict:
        return {"batch": self.batch, "step_ms": round(self.step_ms, 4), "best_k": self.best_k,
                "speedup": round(self.speedup, 4), "speedup_max_k": round(self.speedup_max_k, 4),
                "tokens_per_s": round(self.tokens_per_s, 2)}


def spec_step_time(pm: PerfModel):
    """step_time(batch, context, n) for core.spec_policy: the target's step over `batch` sequences
    of n new tokens each (the last token and n - 1 proposals) at `context` cached tokens. Unlike a
    prefill chunk of n tokens, every one of the n rows gets logits (lm_head and sampling): each
    proposal is checked against the target's distribution at its position."""
    def step_time(batch: int, context: int, n: int) -> float:
        stats = pm.stats(StepShape([SeqWork(n, context)] * batch))
        return pm.step_time(replace(stats, logits=batch * n))
    return step_time


def speculative_plan(pm: PerfModel, context: int, acceptance: float, max_k: int = 4, draft_cost: float = 0.0,
                     batches: tuple[int, ...] = SPEC_BATCHES) -> list[SpecRow]:
    """Predicted speedup of speculative decoding per batch size. acceptance: the probability that a
    proposed token is accepted, in (0, 1); draft_cost: a draft model's time per proposed token as
    a fraction of the target's one-token step (0 for n-gram lookup; the engine takes the draft's
    weight bytes over the target's)."""
    if not (isinstance(acceptance, (int, float)) and 0 < acceptance < 1):
        raise ValueError(f"acceptance must be a number in (0, 1), got {acceptance!r}")
    if not isinstance(max_k, int) or isinstance(max_k, bool) or max_k < 1:
        raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {max_k!r}")
    if not (isinstance(draft_cost, (int, float)) and 0 <= draft_cost < float("inf")):
        raise ValueError(f"draft_cost must be a number >= 0, got {draft_cost!r}")
    step_time = spec_step_time(pm)
    rows = []
    for b in batches:
        gains = [speedup(step_time, b, context, k, acceptance, draft_cost) for k in range(max_k + 1)]
        best = max(range(max_k + 1), key=lambda k: (gains[k], -k))  # ties: fewer proposals (SpecPolicy's rule)
        base = step_time(b, context, 1)
        rows.append(SpecRow(b, base * 1e3, best, gains[best], gains[max_k], b / base * gains[best]))
    return rows


def format_speculative(rows: list[SpecRow], method: str, acceptance: float, max_k: int, draft_cost: float,
                       context: int) -> str:
    cost = f", draft cost {draft_cost:.3g} of a target step per token" if method == "draft" else ""
    lines = [f"speculative decoding ({method}): acceptance {acceptance:g}, k <= {max_k}{cost}, context {context}",
             f"{'batch':>6}{'step ms':>11}{'best k':>8}{'speedup':>9}{f'at k={max_k}':>9}{'tokens/s':>12}"]
    for r in rows:
        lines.append(f"{r.batch:>6}{r.step_ms:>11.3f}{r.best_k:>8}{r.speedup:>9.2f}{r.speedup_max_k:>9.2f}"
                     f"{r.tokens_per_s:>12.1f}")
    return "\n".join(lines)
