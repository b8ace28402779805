"""How many tokens to propose per sequence and step (torch-free).

Verifying k proposals costs one forward over k + 1 rows per sequence. While the step is
memory-bound (few rows: the weights are read once whatever the rows) that is little more than
one token's step, and each step yields (1 - a^(k+1)) / (1 - a) tokens per sequence on average
for a per-token acceptance rate a (the accepted drafts plus the token sampled after them).
Once a large batch makes the step compute-bound, every extra row costs its full share. The
policy picks the k in 0..max_k with the most tokens per second, from a step-time function (the
performance model) and the acceptance rate measured so far; without a step-time function it
always proposes max_k. The model's predictions are corrected by the engine's measured step
times, separately for steps with and without proposals: an uncalibrated model that misjudges
what the extra rows cost (verification, the draft's own steps) is caught after a few steps.
"""

from __future__ import annotations

from collections.abc import Callable

# step_time(batch, context, new_tokens_per_sequence) -> seconds (the target's step)
StepTimeFn = Callable[[int, int, int], float]
PRIOR_ACCEPTANCE = 0.5  # before anything is measured
EXPLORE_EVERY = 32  # steps: when k = 0 wins, still propose 1 token this often, to keep measuring


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a sequence gains per step with k proposals, each accepted with probability `acceptance`."""
    a = min(max(acceptance, 0.0), 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


def speedup(step_time: StepTimeFn, batch: int, context: int, k: int, acceptance: float,
            draft_cost: float = 0.0) -> float:
    """Predicted tokens/s with k proposals over tokens/s without. draft_cost: a draft model's
    time per proposed token as a fraction of the target's one-token step (0 for n-gram lookup)."""
    base = step_time(batch, context, 1)
    spec = step_time(batch, context, k + 1) + draft_cost * k * base
    return expected_tokens(acceptance, k) * base / spec


class SpecPolicy:
    def __init__(self, max_k: int, step_time: StepTimeFn | None = None, draft_cost: float = 0.0,
                 smoothing: float = 0.05):
        self.max_k = max_k
        self.step_time = step_time
        self.draft_cost = draft_cost
        self.smoothing = smoothing  # weight of each step's acceptance in the running estimate
        self.acceptance = PRIOR_ACCEPTANCE
        # measured over predicted step time, for steps without (0) and with (1) proposals
        self.correction = [1.0, 1.0]
        self._steps = 0
        self._cache: dict[tuple[int, int, int, int, int], int] = {}

    def observe(self, num_proposed: int, num_accepted: int) -> None:
        if num_proposed:
            w = 1 - (1 - self.smoothing) ** num_proposed  # a step with more proposals weighs more
            self.acceptance += w * (num_accepted / num_proposed - self.acceptance)

    def observe_step(self, batch: int, context: int, new_per_seq: float, num_proposed: int, seconds: float) -> None:
        """A measured decode step: `batch` sequences computing new_per_seq rows each on average, then
        proposing num_proposed tokens each for the next step."""
        if self.step_time is None or batch == 0:
            return
        predicted = (self.step_time(batch, context, max(1, round(new_per_seq)))
                     + self.draft_cost * num_proposed * self.step_time(batch, context, 1))
        which = 1 if new_per_seq > 1 or num_proposed else 0
        self.correction[which] += 0.1 * (seconds / max(predicted, 1e-9) - self.correction[which])

    def choose(self, batch: int, context: int) -> int:
        """Proposals per sequence for a step of `batch` decoding sequences at about `context` tokens."""
        self._steps += 1
        if self.step_time is None or batch == 0:
            return self.max_k
        # batch and context rounded to powers of two, acceptance to 1/20: few distinct evaluations
        # and the correction's ratio to 1/10: few distinct evaluations
        ratio = self.correction[1] / max(self.correction[0], 1e-9)
        key = (1 << max(0, batch - 1).bit_length(), 1 << max(0, context - 1).bit_length(),
               round(self.acceptance * 20), round(ratio * 10), 0)
        k = self._cache.get(key)
        if k is None:
            b, c, a, r = key[0], key[1], key[2] / 20, key[3] / 10
            gains = [1.0] + [speedup(self.step_time, b, c, k, a, self.draft_cost) / max(r, 1e-9)
                             for k in range(1, self.max_k + 1)]
            k = self._cache[key] = max(range(self.max_k + 1), key=lambda i: (gains[i], -i))
        if k == 0 and self._steps % EXPLORE_EVERY == 0:
            return 1
        return k
