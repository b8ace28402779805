"""Step latency from the roofline: each operator takes max(FLOPs / compute rate, bytes / bandwidth),
scaled by the spec's efficiencies, plus dispatch overheads; then the serving quantities built
from steps (TTFT, TPOT, throughput, the batch that fits in memory)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ModelConfig
from .hardware import DTYPE_BYTES, HardwareSpec
from .ops import OpCost, SeqWork, StepShape, StepStats, kv_bytes_per_token, operator_table, weight_bytes


# Operators one shared-prefix attention part adds per layer (hydragen.hydragen_decode: two
# gathers and upcasts, the query regrouping, QK^T, scale, logsumexp, exp, PV, the reshapes back,
# and the log-sum-exp merge with the rows' own part).
SHARED_PART_OPS = 20


@dataclass
class OpTime:
    name: str
    kind: str
    flops: float
    bytes: float
    time_s: float
    bound: str  # "compute", "memory" or "overhead"

    @property
    def intensity(self) -> float:
        """Arithmetic intensity in FLOPs per byte."""
        return self.flops / self.bytes if self.bytes else math.inf


@dataclass
class StepPrediction:
    total_s: float
    ops: list[OpTime]
    host_s: float  # per-step and per-sequence host work

    def time_by_bound(self) -> dict[str, float]:
        out = {"compute": 0.0, "memory": 0.0, "overhead": self.host_s}
        for op in self.ops:
            out[op.bound] += op.time_s
        return out

    @property
    def bound(self) -> str:
        """The resource the step spends most of its time on."""
        by = self.time_by_bound()
        return max(by, key=by.get)


class PerfModel:
    """Roofline latency model of one model on one hardware spec at given dtypes."""

    def __init__(self, model: ModelConfig, hardware: HardwareSpec, dtype: str = "bfloat16",
                 weight_dtype: str | None = None, kv_dtype: str | None = None, block_size: int = 16,
                 max_num_batched_tokens: int = 2048):
        if block_size < 1 or max_num_batched_tokens < 1:
            raise ValueError("block_size and max_num_batched_tokens must be >= 1")
        self.model = model
        self.hw = hardware
        self.dtype = dtype
        self.weight_dtype = weight_dtype or dtype
        self.kv_dtype = kv_dtype or dtype
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.ops: list[OpCost] = operator_table(model, dtype, self.weight_dtype, self.kv_dtype)
        # (op, seconds per FLOP, seconds per byte, dispatch seconds): the simulator tabulates these
        self.op_rates = self._op_rates()

    def _op_rates(self) -> list[tuple[OpCost, float, float, float]]:
        """(op, seconds per FLOP, seconds per byte, dispatch seconds) with the efficiencies folded in."""
        hw = self.hw
        peak = hw.peak(self.dtype)
        bw = hw.memory_bandwidth * hw.memory_efficiency
        out = []
        for op in self.ops:
            sf, sb = 1.0 / (peak * hw.compute_efficiency), 1.0 / bw
            if op.kind == "attention":
                sf, sb = sf / hw.attention_compute_efficiency, sb / hw.attention_memory_efficiency
            out.append((op, sf, sb, op.count * hw.op_overhead_s))
        return out

    # ------------------------------------------------------------------ one step

    def stats(self, step: StepShape | StepStats) -> StepStats:
        if isinstance(step, StepStats):
            return step
        return step.stats(self.model.sliding_window, self.hw.shared_prefix_efficiency,
                          self.model.window_layer_fraction)

    def step_time(self, step: StepShape | StepStats) -> float:
        """Predicted seconds of one engine step (the simulator's hot path)."""
        stats = self.stats(step)
        return self.step_time_vector(stats.vector(), stats.shared_parts)

    @property
    def shared_part_overhead_s(self) -> float:
        """Dispatch cost of one shared-prefix (Hydragen) attention part: its gathers, grouped
        products and log-sum-exp merge are SHARED_PART_OPS extra operators in every layer."""
        return SHARED_PART_OPS * self.model.num_layers * self.hw.op_overhead_s

    def step_time_vector(self, v: tuple[float, ...], shared_parts: int = 0) -> float:
        total = self.hw.step_overhead_s + self.hw.seq_overhead_s * v[1] + shared_parts * self.shared_part_overhead_s
        for op, sf, sb, dispatch in self.op_rates:
            total += max(op.flops_for(v) * sf, op.bytes_for(v) * sb) + dispatch
        return total

    def predict(self, step: StepShape | StepStats) -> StepPrediction:
        """Step time with the per-operator breakdown and the bound of each operator."""
        stats = self.stats(step)
        v = stats.vector()
        host = (self.hw.step_overhead_s + self.hw.seq_overhead_s * v[1]
                + stats.shared_parts * self.shared_part_overhead_s)
        ops = []
        for op, sf, sb, dispatch in self.op_rates:
            f, b = op.flops_for(v), op.bytes_for(v)
            tc, tm = f * sf, b * sb
            bound = "compute" if tc >= tm else "memory"
            if dispatch > max(tc, tm):
                bound = "overhead"
            ops.append(OpTime(op.name, op.kind, f, b, max(tc, tm) + dispatch, bound))
        return StepPrediction(host + sum(o.time_s for o in ops), ops, host)

    # ------------------------------------------------------------------ memory

    @property
    def weight_bytes(self) -> float:
        return weight_bytes(self.model, self.weight_dtype)

    @property
    def kv_bytes_per_token(self) -> float:
        return kv_bytes_per_token(self.model, self.kv_dtype)

    @property
    def kv_bytes_per_block(self) -> int:
        return int(self.kv_bytes_per_token * self.block_size)

    def activation_bytes(self) -> float:
        """Peak activations of the largest step: the token budget's widest intermediate tensors
        (gate/up output plus the residual stream and qkv) and one float32 logits row per sequence."""
        cfg, a = self.model, DTYPE_BYTES[self.dtype]
        t = self.max_num_batched_tokens
        widest = 2 * cfg.intermediate_size + 2 * cfg.hidden_size + cfg.q_size + 2 * cfg.kv_size
        return t * widest * a + 4 * cfg.vocab_size * min(t, 256)

    def kv_blocks(self, kv_memory: float | None = None) -> int:
        """Blocks in the KV pool: of `kv_memory` bytes (the engine's kv_cache_memory rule), or of
        what the device has left after weights and activations."""
        if kv_memory is None:
            kv_memory = (self.hw.memory_capacity * self.hw.memory_utilization - self.weight_bytes
                         - self.activation_bytes())
        return max(0, int(kv_memory // self.kv_bytes_per_block))

    def blocks_per_sequence(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def max_batch(self, prompt_len: int, output_len: int, kv_memory: float | None = None) -> int:
        """Most sequences that can hold their full KV (prompt + output) at once."""
        return self.kv_blocks(kv_memory) // self.blocks_per_sequence(prompt_len + output_len)

    # ------------------------------------------------------------------ serving quantities

    def prefill_time(self, prompt_len: int, decode_batch: int = 0, decode_context: int = 0,
                     cached_tokens: int = 0) -> float:
        """Seconds to prefill one prompt in token-budget chunks, each step also carrying
        `decode_batch` running decodes (Sarathi-Serve's mixed batches)."""
        total, done = 0.0, min(cached_tokens, prompt_len - 1)
        room = max(1, self.max_num_batched_tokens - decode_batch)
        while done < prompt_len:
            n = min(room, prompt_len - done)
            seqs = [SeqWork(n, done, done + n == prompt_len)] + [SeqWork(1, decode_context)] * decode_batch
            total += self.step_time(StepShape(seqs))
            done += n
        return total

    def decode_step_time(self, batch: int, context: int) -> float:
        return self.step_time(StepShape.decode(batch, context))
