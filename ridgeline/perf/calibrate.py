"""`ridgeline perf calibrate`: time a few real engine steps and fit the spec's efficiency and
overhead terms (HELP's few-sample idea: the roofline supplies the shape of the latency
function, a handful of measurements on the new device pins its constants).

A step of a chosen shape is built as the scheduler would emit it (a core.SchedulerOutput of
ScheduledSeqs whose first `context` tokens count as computed, block tables from a block
manager the size of the engine's pool, Hydragen's shared-prefix parts from the engine's
policy) and timed through the engine's ModelRunner (metadata, forward, sampling): the KV
contents are zeros, which costs the same. The scheduler's own bookkeeping and the output
processor are not timed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import statistics
import time
from dataclasses import dataclass

import torch

from ..core.kv_blocks import BlockManager
from ..core.prefix_groups import find_shared_prefixes
from ..core.request import Request, Sequence, SeqStatus
from ..core.scheduler import ScheduledSeq, SchedulerOutput
from ..core.config import EngineConfig
from ..engine import LLMEngine
from ..sampling_params import SamplingParams
from .hardware import HardwareSpec
from .ops import SeqWork, StepShape
from .predictor import SHARED_PART_OPS, PerfModel

REPEATS = 5  # timings per step shape, the fastest counts (EngineStepTimer.measure); as the CLI's default

# The fitted terms, in log space during the fit (all must stay positive).
FIT_TERMS = ("compute_efficiency", "memory_efficiency", "attention_compute_efficiency",
             "attention_memory_efficiency", "op_overhead_s", "step_overhead_s", "seq_overhead_s",
             "shared_prefix_efficiency")


def _shared_decode(batch: int, context: int, prefix: int, groups: int = 1) -> StepShape:
    """`batch` decodes at `context` in `groups` equal groups, each group's first `prefix` tokens
    the same cached blocks (chosen so that the engine's Hydragen rule engages)."""
    size = batch // groups
    return StepShape([SeqWork(1, context)] * batch,
                     shared_prefixes=[(tuple(range(g * size, (g + 1) * size)), prefix) for g in range(groups)])

# Ten shapes chosen to pin one term each or two at once: host overhead (tiny decode), weight
# streaming (batch-1 decode), KV streaming (long-context decode), GEMM rate (long prefills),
# attention compute (a chunk late in a long prompt), per-sequence cost (wide decode), mixes,
# and what shared prefixes save and cost (wide decode over four cached prefixes: the reads a
# part saves and the operators each part adds, as serving a few system prompts does; with one
# part the two were confounded, and a fit that overpriced parts 3x passed the held-out grid).
CALIBRATION_SHAPES: list[tuple[str, StepShape]] = [
    ("decode b1 c16", StepShape.decode(1, 16)),
    ("decode b1 c2048", StepShape.decode(1, 2048)),
    ("decode b64 c128", StepShape.decode(64, 128)),
    ("decode b16 c2048", StepShape.decode(16, 2048)),
    ("prefill 64@0", StepShape.prefill(64)),
    ("prefill 512@0", StepShape.prefill(512)),
    ("prefill 256@2048", StepShape.prefill(256, 2048)),
    ("mixed 16 decodes c256 + prefill 256@0", StepShape([SeqWork(1, 256)] * 16 + [SeqWork(256, 0)])),
    ("prefill 1024@1024", StepShape.prefill(1024, 1024)),
    ("decode b32 c512 sharing 448 x4", _shared_decode(32, 512, 448, groups=4)),
]


def holdout_grid(limit_kv_tokens: int = 131072) -> list[tuple[str, StepShape]]:
    """Step shapes never used in the fit: decodes over batch 1..64 x context 16..4096, prefill
    chunks 16..1024 at several starts, and decode + prefill mixes (at least 30 shapes)."""
    shapes = []
    for b in (1, 2, 4, 8, 16, 32, 64):
        for c in (16, 128, 1024, 4096):
            if b * c <= limit_kv_tokens and (b, c) not in ((1, 16),):
                shapes.append((f"decode b{b} c{c}", StepShape.decode(b, c)))
    for n in (16, 128, 384, 1024):
        for start in (0, 768, 3072):
            shapes.append((f"prefill {n}@{start}", StepShape.prefill(n, start)))
    for b, c, n in ((4, 1024, 128), (32, 256, 512), (8, 3000, 64), (48, 64, 1024)):
        shapes.append((f"mixed {b} decodes c{c} + prefill {n}@0",
                       StepShape([SeqWork(1, c)] * b + [SeqWork(n, 0)])))
    for b, c, p, n in ((8, 2048, 1792, 1), (16, 1024, 768, 1), (64, 384, 256, 1), (64, 384, 256, 4)):
        shapes.append((f"decode b{b} c{c} sharing {p}" + (f" x{n}" if n > 1 else ""), _shared_decode(b, c, p, n)))
    return shapes


@dataclass
class Sample:
    label: str
    shape: StepShape
    measured_s: float
    predicted_s: float = 0.0

    @property
    def error(self) -> float:
        return abs(self.predicted_s - self.measured_s) / self.measured_s


class EngineStepTimer:
    """Times engine steps of chosen shapes on a real engine."""

    def __init__(self, model: str | None = None, dtype: str = "auto", device: str = "auto",
                 kv_tokens: int = 140_000, repeats: int = REPEATS, seed: int = 0):
        block = 16
        self.engine = LLMEngine(EngineConfig.from_kwargs(
            model=model, dtype=dtype, device=device, num_kv_blocks=-(-kv_tokens // block), block_size=block,
            max_num_seqs=256, max_num_batched_tokens=4096, enable_prefix_caching=False))
        self.repeats = repeats
        self.rng = random.Random(seed)
        eng = self.engine
        # the step's block tables: a pool the engine's size, so shared-prefix blocks are real shared ids
        self._blocks = BlockManager(eng.num_kv_blocks, eng.block_size, eng.enable_prefix_caching)
        self.hydragen = eng.hydragen  # the shared-prefix policy the engine's scheduler runs
        self._finished: list[int] = []  # seq ids the runner has not been told are gone
        self._ids = itertools.count()

    @property
    def dtype(self) -> str:
        return str(self.engine.dtype).removeprefix("torch.")

    @property
    def kv_usage(self) -> float:
        """The fraction of the timer's KV blocks held (0 between steps)."""
        return self._blocks.usage

    def _sequence(self, work: SeqWork) -> Sequence:
        """A running sequence of context_len + new_tokens random prompt tokens whose first
        context_len count as computed (validated as the engine validates a prompt)."""
        eng = self.engine
        vocab = eng.model_config.vocab_size
        ids = [self.rng.randrange(3, vocab) for _ in range(work.context_len + work.new_tokens)]
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        processed = eng.inputs.process(ids, params)
        req = Request.create(f"calibrate-{next(self._ids)}", processed.token_ids, params, base_seed=0)
        seq = req.seqs[0]
        seq.num_computed_tokens = work.context_len
        seq.status = SeqStatus.RUNNING
        return seq

    def build_step(self, shape: StepShape) -> SchedulerOutput:
        """The SchedulerOutput the engine's scheduler would emit for the shape: each sequence computes
        its new tokens and samples; rows named in a shared prefix after the first start their block
        tables with the first row's blocks of that prefix (held by both, as after prefix-cache hits);
        decode rows first; Hydragen's parts as the engine's policy finds them."""
        if not all(w.sampled for w in shape.seqs):
            raise ValueError("calibration shapes must end their prompts in the step (sampled=True)")
        bm, bs = self._blocks, self._blocks.block_size
        share_of = {r: length // bs for rows, length in shape.shared_prefixes for r in rows[1:]}
        lead_of = {r: rows[0] for rows, _ in shape.shared_prefixes for r in rows[1:]}
        items: dict[int, ScheduledSeq] = {}  # by index into shape.seqs
        try:
            for i, w in enumerate(shape.seqs):
                seq = self._sequence(w)
                items[i] = ScheduledSeq(seq, w.context_len, w.new_tokens, sample=True)
                if i in lead_of:
                    if lead_of[i] not in items:
                        raise ValueError(f"a shared prefix's first row must come first in the shape, got {shape}")
                    # the lead's first blocks, held by both as after a prefix-cache hit
                    bm.reuse(seq.block_table, items[lead_of[i]].seq.block_table[:share_of[i]],
                             seq.num_prompt_tokens)
                if not bm.can_allocate(seq.block_table, seq.num_tokens):
                    raise ValueError(f"the calibration engine's KV pool ({self.engine.num_kv_blocks} blocks of "
                                     f"{bs}) cannot hold a step of {len(shape.seqs)} sequences and "
                                     f"{sum(w.context_len + w.new_tokens for w in shape.seqs)} tokens")
                bm.allocate(seq.block_table, seq.num_tokens)
        except BaseException:
            self._release(list(items.values()))
            raise
        out = SchedulerOutput(finished_seq_ids=self._finished)
        self._finished = []
        out.seqs = sorted(items.values(), key=lambda s: s.num_new_tokens != 1)  # stable: decode rows first
        n_dec = out.num_decode_rows
        if shape.shared_prefixes and self.hydragen is not None and n_dec >= 2:
            dec = out.seqs[:n_dec]
            parts, own = find_shared_prefixes([s.seq.block_table for s in dec], [s.start // bs for s in dec],
                                              bs, self.hydragen)
            if parts:
                out.shared_prefixes, out.own_start_blocks = parts, own
        return out

    def _release(self, items: list[ScheduledSeq]) -> None:
        """Free the step's blocks; the runner hears of its sequences at the next step."""
        for item in items:
            self._blocks.free(item.seq.block_table)
            item.seq.status = SeqStatus.FINISHED
            self._finished.append(item.seq.seq_id)

    def run_step(self, shape: StepShape) -> float:
        """Wall seconds of the engine's ModelRunner executing one step of the shape."""
        out = self.build_step(shape)
        sync()
        t = time.perf_counter()
        self.engine.runner.execute(out)
        sync()
        elapsed = time.perf_counter() - t
        self._release(out.seqs)
        return elapsed

    def measure(self, shapes: list[tuple[str, StepShape]], warmup: int = 2) -> list[Sample]:
        """Fastest of `repeats` rounds, each timing every shape once. On a shared machine noise
        only adds time, in bursts that can last a whole round (a long-context decode measured 32
        and 88 ms in one process), so the minimum is the stable estimate of a step's cost: on
        this VM the held-out error over two calibrations was 6.7 and 9.5 % with the minimum of
        5, 8.9 and 15.5 % with their median (docs/benchmarks.md). The first steps of a new
        shape pay one-off costs (kernel selection, first-touch memory): `warmup` rounds."""
        for _ in range(warmup):
            for _, shape in shapes:
                self.run_step(shape)
        times: list[list[float]] = [[] for _ in shapes]
        for _ in range(self.repeats):
            for i, (_, shape) in enumerate(shapes):
                times[i].append(self.run_step(shape))
        return [Sample(label, shape, min(t)) for (label, shape), t in zip(shapes, times)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _with_terms(spec: HardwareSpec, values: dict[str, float]) -> HardwareSpec:
    return dataclasses.replace(spec, **values)


def fit(spec: HardwareSpec, perf_args: dict, samples: list[Sample], restarts: int = 4,
        iterations: int = 1500) -> HardwareSpec:
    """Least squares on log(predicted / measured) over the FIT_TERMS, parameterised by their
    logs (so they stay positive), with Adam from a few starting points: the roofline's max()
    is piecewise smooth, and eight terms against ten samples is a tiny problem. Without a
    shared-prefix sample, shared_prefix_efficiency keeps the spec's value."""
    model = PerfModel(perf_args["model"], spec, **perf_args["options"])
    window = model.model.sliding_window

    def per_op(saving: float, per: str) -> torch.Tensor:
        vs = [s.shape.stats(window, saving, model.model.window_layer_fraction).vector() for s in samples]
        return torch.tensor([[getattr(op, per)(v) for op in model.ops] for v in vs], dtype=torch.float64)

    flops = per_op(0.0, "flops_for")  # sharing changes K/V reads, not FLOPs
    bytes_unshared = per_op(0.0, "bytes_for")
    bytes_saved = bytes_unshared - per_op(1.0, "bytes_for")  # bytes = unshared - efficiency x saved
    attn = torch.tensor([op.kind == "attention" for op in model.ops])
    # operators per step: the table's, plus each shared-prefix part's in every layer
    num_ops = torch.tensor([sum(op.count for op in model.ops)
                            + len(s.shape.shared_prefixes) * SHARED_PART_OPS * model.model.num_layers
                            for s in samples], dtype=torch.float64)
    seqs = torch.tensor([len(s.shape.seqs) for s in samples], dtype=torch.float64)
    measured = torch.tensor([s.measured_s for s in samples], dtype=torch.float64)
    peak, bw = spec.peak(model.dtype), spec.memory_bandwidth
    has_shared = bool(bytes_saved.abs().sum() > 0)

    def predicted(theta: torch.Tensor) -> torch.Tensor:
        ce, me, ace, ame, op_oh, step_oh, seq_oh, share = theta.exp().unbind()
        compute = flops / (peak * ce * torch.where(attn, ace, 1.0))
        memory = (bytes_unshared - share * bytes_saved) / (bw * me * torch.where(attn, ame, 1.0))
        return torch.maximum(compute, memory).sum(1) + num_ops * op_oh + step_oh + seq_oh * seqs

    cap = math.log(1.5)
    share0 = spec.shared_prefix_efficiency
    starts = [[0.5, 0.5, 0.5, 0.5, 5e-6, 1e-3, 2e-5, 0.5], [0.8, 0.8, 0.3, 0.3, 1e-5, 1e-4, 1e-6, 0.9],
              [0.3, 0.3, 0.1, 0.1, 2e-6, 5e-3, 1e-4, 0.2], [1.0, 1.0, 1.0, 1.0, 2e-5, 1e-3, 1e-5, 0.7]][:restarts]
    best, best_loss = None, math.inf
    for start in starts:
        if not has_shared:
            start = start[:7] + [share0]
        theta = torch.tensor(start, dtype=torch.float64).log().requires_grad_()
        opt = torch.optim.Adam([theta], lr=0.05)
        for _ in range(iterations):
            opt.zero_grad()
            loss = ((predicted(theta) / measured).log() ** 2).sum()
            loss.backward()
            if not has_shared:
                theta.grad[7] = 0.0
            opt.step()
            with torch.no_grad():
                theta[:4].clamp_(max=cap)
                theta[4:7].clamp_(min=math.log(1e-9))
                theta[7].clamp_(max=0.0, min=math.log(1e-3))
        with torch.no_grad():
            final = float(((predicted(theta) / measured).log() ** 2).sum())
        if final < best_loss:
            best, best_loss = theta.detach().exp().tolist(), final
    return _with_terms(spec, dict(zip(FIT_TERMS, best)))


def predict(spec: HardwareSpec, perf_args: dict, samples: list[Sample]) -> float:
    """Fill in predictions; return the mean absolute percentage error."""
    model = PerfModel(perf_args["model"], spec, **perf_args["options"])
    for s in samples:
        s.predicted_s = model.step_time(s.shape)
    return 100 * statistics.fmean(s.error for s in samples)


@dataclass
class CalibrationResult:
    spec: HardwareSpec
    samples: list[Sample]
    holdout: list[Sample]
    fit_mape: float
    mape: float | None  # on the held-out grid; None when it was skipped

    def to_dict(self) -> dict:
        def rows(samples: list[Sample]) -> list[dict]:
            return [{"shape": s.label, "measured_ms": round(s.measured_s * 1e3, 3),
                     "predicted_ms": round(s.predicted_s * 1e3, 3), "error_pct": round(100 * s.error, 1)}
                    for s in samples]

        return {"spec": self.spec.name, "fit": {k: getattr(self.spec, k) for k in FIT_TERMS},
                "fit_mape": round(self.fit_mape, 2), "mape": None if self.mape is None else round(self.mape, 2),
                "samples": rows(self.samples), "holdout": rows(self.holdout)}


def calibrate(model: str | None = None, dtype: str = "auto", device: str = "auto", name: str | None = None,
              num_samples: int = 10, holdout: bool = True, repeats: int = REPEATS,
              base: HardwareSpec | None = None) -> CalibrationResult:
    """Probe (unless `base` is given), time `num_samples` calibration steps, fit, and measure the
    held-out grid. The caller saves result.spec."""
    if not 1 <= num_samples <= len(CALIBRATION_SHAPES):
        raise ValueError(f"num_samples must be in [1, {len(CALIBRATION_SHAPES)}], got {num_samples}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    from ..loader import stored_weight_format
    from .hardware import local_spec_name
    from .probe import probe

    name = name or local_spec_name()
    shapes = CALIBRATION_SHAPES[:num_samples] + (holdout_grid() if holdout else [])
    kv_tokens = max(sum(w.context_len + w.new_tokens + 16 for w in shape.seqs) for _, shape in shapes)
    timer = EngineStepTimer(model, dtype, device, kv_tokens=kv_tokens, repeats=repeats)
    spec = dataclasses.replace(base, name=name) if base is not None else probe(name, device)
    # the engine keeps a GGUF's blocks (quantization "auto"): price the weights as stored
    weight_dtype = stored_weight_format(timer.engine.model_path) if timer.engine.config.quantization != "none" else None
    perf_args = {"model": timer.engine.model_config, "options": {"dtype": timer.dtype, "weight_dtype": weight_dtype}}
    # Held-out shapes are timed in the same rounds as the calibration samples (so drift of a
    # shared machine hits both alike) but never enter the fit.
    measured = timer.measure(shapes)
    samples, held = measured[:num_samples], measured[num_samples:]
    fitted = fit(spec, perf_args, samples)
    fit_mape = predict(fitted, perf_args, samples)
    mape = predict(fitted, perf_args, held) if held else None
    fitted.calibrated = {"model": str(timer.engine.model_path.name), "dtype": timer.dtype,
                         "weight_dtype": weight_dtype or timer.dtype,
                         "samples": num_samples, "fit_mape": round(fit_mape, 2),
                         "holdout_mape": None if mape is None else round(mape, 2), "holdout_shapes": len(held),
                         "date": time.strftime("%Y-%m-%d")}
    return CalibrationResult(fitted, samples, held, fit_mape, mape)
