"""Step times from the calibrated roofline model, fast enough for millions of simulated steps.

`PerfModel.step_time_vector` costs ~20 us (a loop over `PerfModel.op_rates`). Most operators depend
on one step aggregate only (GEMMs and element-wise ops on tokens, lm_head and sampling on
logit rows, host work on sequences), so their summed time is tabulated per value once; only
operators mixing aggregates (attention) are evaluated per step. The tables are checked
against `step_time_vector` on construction, and the model falls back to it on any mismatch,
so the simulator always times steps exactly as the perf model does. Hydragen's shared-prefix
parts add a constant dispatch cost each (PerfModel.shared_part_overhead_s), outside the tables.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..perf import PerfModel

_NDIM = 5  # tokens, seqs, logits, attn_pairs, kv_read (ridgeline.perf.ops.STAT_NAMES)
_NEVER = 1 << 60  # a block count no run reaches


@dataclass(frozen=True)
class _MixedOp:
    """max(flops . v, bytes_const + bytes . v) + dispatch, all in seconds."""
    f: tuple[float, ...]
    bc: float
    b: tuple[float, ...]
    dispatch: float

    def time(self, v: tuple[float, ...]) -> float:
        f, b = self.f, self.b
        return max(f[0] * v[0] + f[1] * v[1] + f[2] * v[2] + f[3] * v[3] + f[4] * v[4],
                   self.bc + b[0] * v[0] + b[1] * v[1] + b[2] * v[2] + b[3] * v[3] + b[4] * v[4]) + self.dispatch


class StepTimer:
    """`time(tokens, seqs, logits, attn_pairs, kv_read, parts)` equal to `pm.step_time_vector`."""

    def __init__(self, pm: PerfModel, max_tokens: int, max_seqs: int):
        self.pm = pm
        self.part_s = pm.shared_part_overhead_s  # one shared-prefix part's dispatch cost per step
        self._size = max(max_tokens, max_seqs) + 1
        self._fast = self._build()
        self._fast = self._fast and self._verify()  # tables must equal step_time_vector, else no fast path

    def _build(self) -> bool:
        rates = self.pm.op_rates
        if not rates:
            return False
        hw = self.pm.hw
        self.const = hw.step_overhead_s
        # One table per single-aggregate dimension (tokens, seqs, logits); host work per sequence too.
        tables = [[0.0] * self._size for _ in range(3)]
        for x in range(self._size):
            tables[1][x] += hw.seq_overhead_s * x
        self.mixed: list[_MixedOp] = []
        for op, sf, sb, dispatch in rates:
            f = tuple(op.count * c * sf for c in op.flops)
            b = tuple(op.count * c * sb for c in op.bytes)
            bc = op.count * op.bytes_const * sb
            dims = [i for i in range(_NDIM) if f[i] or b[i]]
            if not dims:
                self.const += max(0.0, bc) + dispatch
            elif len(dims) == 1 and dims[0] < 3:
                i, table = dims[0], tables[dims[0]]
                for x in range(self._size):
                    table[x] += max(f[i] * x, bc + b[i] * x) + dispatch
            else:
                self.mixed.append(_MixedOp(f, bc, b, dispatch))
        self.t_tokens, self.t_seqs, self.t_logits = tables
        self._coef_cache: list[list | None] = [None] * self._size  # decode runs' coefficients per batch
        return True

    def _verify(self) -> bool:
        rng = random.Random(1)
        for _ in range(50):
            t = rng.randint(1, self._size - 1)
            s = rng.randint(1, min(t, self._size - 1))
            v = (t, s, rng.randint(0, s), rng.uniform(0, 1e7), rng.uniform(0, 1e6))
            parts = rng.randint(0, 8)
            ref = self.pm.step_time_vector(v, parts)
            if abs(self.time(*v, parts) - ref) > 1e-9 * max(1.0, ref):
                return False
        return True

    @property
    def fast(self) -> bool:
        return self._fast

    def time(self, tokens: int, seqs: int, logits: int, pairs: float, kv_read: float, parts: int = 0) -> float:
        """One step's seconds; parts: its Hydragen shared-prefix parts."""
        if not self._fast or tokens >= self._size or seqs >= self._size:
            return self.pm.step_time_vector((tokens, seqs, logits, pairs, kv_read), parts)
        total = self.const + self.t_tokens[tokens] + self.t_seqs[seqs] + self.t_logits[logits]
        if parts:
            total += parts * self.part_s
        v = (tokens, seqs, logits, pairs, kv_read)
        for op in self.mixed:
            total += op.time(v)
        return total

    def decode_run(self, batch: int, x0: float, max_steps: int, t0: float, until: float | None = None,
                   avail: int | None = None, block_counts: list[int] | None = None, step0: int = 0,
                   saved: float = 0.0, saved_until: int | None = None, parts: int = 0) -> tuple[int, float, int]:
        """Time a run of decode-only steps of `batch` sequences: step j reads x0 + j * batch KV
        positions (and as many attention pairs). Stops after max_steps, or after the first step
        ending at or after `until`, or before a step needing more new blocks than `avail` (the
        step with global index i needs block_counts[-i % len] blocks). Hydragen: steps read
        `saved` fewer KV positions (not fewer pairs) while the blocks used so far, the step's own
        included, are at most `saved_until` (None: every step; only checked with block_counts), and
        pay `parts` shared-prefix parts' dispatch cost (none once the saving is off).
        Returns (steps, end time, blocks used)."""
        bs = len(block_counts) if block_counts else 1
        sav = saved
        on = bool(saved or parts)  # Hydragen engaged (a part saves no reads on a device without the gain)
        npart = parts if on else 0
        if self._fast and batch < self._size:
            base0 = self.const + self.t_tokens[batch] + self.t_seqs[batch] + self.t_logits[batch]
            base = base0 + npart * self.part_s if npart else base0
            coeffs = self._run_coefficients(batch, saved) if saved else self._coefficients(batch)
        else:
            base, coeffs = None, []
        cap = saved_until if on and saved_until is not None else _NEVER
        t, x, used, k = t0, x0, 0, 0
        single = coeffs[0] if len(coeffs) == 1 else None
        while k < max_steps:
            if block_counts is not None:
                need = block_counts[-(step0 + k) % bs]
                if used + need > avail:
                    break
                used += need
                if used > cap:  # Hydragen off from this step on (the fraction rule)
                    sav, cap, npart = 0.0, _NEVER, 0
                    if base is not None:
                        base = base0
                        coeffs = self._coefficients(batch)
                        single = coeffs[0] if len(coeffs) == 1 else None
            if single is not None:
                a1, a2, b1, b2, d = single
                fa, fb = a1 + a2 * x, b1 + b2 * x
                t += base + (fa if fa > fb else fb) + d
            elif base is not None:
                t += base + sum(max(a1 + a2 * x, b1 + b2 * x) + d for a1, a2, b1, b2, d in coeffs)
            else:
                t += self.pm.step_time_vector((batch, batch, batch, x, x - sav), npart)
            x += batch
            k += 1
            if until is not None and t >= until:
                break
        return k, t, used

    def _coefficients(self, batch: int) -> list[tuple[float, float, float, float, float]]:
        coeffs = self._coef_cache[batch]
        if coeffs is None:
            coeffs = self._coef_cache[batch] = self._run_coefficients(batch, 0.0)
        return coeffs

    def _run_coefficients(self, batch: int, sav: float) -> list[tuple[float, float, float, float, float]]:
        """Each mixed operator of a decode step as max(a1 + a2 x, b1 + b2 x) + d, x the KV positions:
        v = (batch, batch, batch, x, x - sav)."""
        return [(op.f[0] * batch + op.f[1] * batch + op.f[2] * batch - op.f[4] * sav, op.f[3] + op.f[4],
                 op.bc + op.b[0] * batch + op.b[1] * batch + op.b[2] * batch - op.b[4] * sav,
                 op.b[3] + op.b[4], op.dispatch) for op in self.mixed]
