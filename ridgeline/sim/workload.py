"""The simulated workload: `ridgeline bench serve`'s datasets and arrival process, as token lengths.

The simulator needs no text, only each request's prompt and output lengths and which cached
prefixes its prompt can share, so the bench datasets are drawn with text=False (same
distributions, 100k requests in well under a second). A word counts as one token and every
prompt gets one BOS token, as the bench datasets are designed to be tokenized.

Shared prefixes are a chain of nested keys with their lengths in tokens: prefix-repetition
prompts share ("prefix", k); a multi-turn request shares the system prompt and every earlier
turn of its conversation (turn t's prompt is turn t-1's prompt plus a reply and a new user
message), so its chain is ("system",), ("conv", c, 0), ..., ("conv", c, t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Hashable

from ..bench.client import DATASETS, build_dataset, inter_arrival_times

BOS_TOKENS = 1

PrefixChain = tuple[tuple[Hashable, int], ...]


@dataclass
class WorkloadSpec:
    """The bench serve options that shape a workload (same names and defaults)."""
    dataset: str = "random"
    num_requests: int = 100
    seed: int = 0
    random_input_len: int = 128
    random_output_len: int = 64
    random_range_ratio: float = 0.0
    prefix_repetition_prefix_len: int = 256
    prefix_repetition_suffix_len: int = 32
    prefix_repetition_num_prefixes: int = 4
    prefix_repetition_output_len: int = 64
    multi_turn_num_turns: int = 4
    multi_turn_system_len: int = 128
    multi_turn_user_len: int = 32
    multi_turn_assistant_len: int = 32
    multi_turn_output_len: int = 64
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {self.dataset!r}")
        if not isinstance(self.num_requests, int) or self.num_requests < 1:
            raise ValueError(f"--num-requests must be an integer >= 1, got {self.num_requests!r}")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (inf = all at once), got {self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"--burstiness must be a finite number > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        # The dataset functions check their lengths; name the options in their errors.
        for name in ("random_input_len", "random_output_len", "prefix_repetition_prefix_len",
                     "prefix_repetition_num_prefixes", "prefix_repetition_output_len", "multi_turn_num_turns",
                     "multi_turn_user_len", "multi_turn_output_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        for name in ("prefix_repetition_suffix_len", "multi_turn_system_len", "multi_turn_assistant_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
        if not 0 <= self.random_range_ratio < 1:
            raise ValueError(f"--random-range-ratio must be in [0, 1), got {self.random_range_ratio}")


@dataclass
class Workload:
    """Per-request arrays (index = request id, in send order) and the arrival times."""
    prompt_len: list[int]  # tokens, BOS included
    output_len: list[int]  # max_tokens; every request runs to it (ignore_eos)
    chains: list[PrefixChain]  # shared prefixes, shortest first
    route_keys: list[Hashable | None]  # what prefix-aware routing keeps together
    arrivals: list[float]  # open-loop send times (s); closed loop sends later when the cap is reached
    max_concurrency: int | None = None
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt_len)


def build_workload(spec: WorkloadSpec) -> Workload:
    spec.validate()
    args = SimpleNamespace(**{k: v for k, v in vars(spec).items() if k != "num_requests"},
                           num_prompts=spec.num_requests)
    reqs = build_dataset(args, text=False)
    n = len(reqs)
    prompt = [r.input_len + BOS_TOKENS for r in reqs]
    output = [r.output_len for r in reqs]
    chains: list[PrefixChain] = [()] * n
    keys: list[Hashable | None] = [None] * n
    if spec.dataset == "prefix-repetition":
        plen = spec.prefix_repetition_prefix_len + BOS_TOKENS
        for i, r in enumerate(reqs):
            key = ("prefix", r.meta["prefix"])
            chains[i] = ((key, plen),)
            keys[i] = key
    elif spec.dataset == "multi-turn":
        s, u, a = spec.multi_turn_system_len, spec.multi_turn_user_len, spec.multi_turn_assistant_len
        system = ((("system",), BOS_TOKENS + s),) if s else ()
        for i, r in enumerate(reqs):
            c, t = r.meta["conversation"], r.meta["turn"]
            turns = tuple((("conv", c, k), BOS_TOKENS + s + (k + 1) * u + k * a) for k in range(t + 1))
            chains[i] = system + turns
            keys[i] = ("conv", c)
    gaps = inter_arrival_times(n, spec.request_rate, spec.burstiness, spec.seed)
    arrivals = [0.0] * n
    t = 0.0
    for i, g in enumerate(gaps, start=1):
        t += g
        arrivals[i] = t
    return Workload(prompt, output, chains, keys, arrivals, spec.max_concurrency,
                    {"dataset": spec.dataset, "requests": n})


def synthetic_workload(prompt_len: list[int], output_len: list[int], arrivals: list[float] | None = None,
                       chains: list[PrefixChain] | None = None, route_keys: list[Hashable | None] | None = None,
                       max_concurrency: int | None = None) -> Workload:
    """A workload given directly (tests, traces); prompt lengths include BOS."""
    n = len(prompt_len)
    if len(output_len) != n or any(p < 1 for p in prompt_len) or any(o < 1 for o in output_len):
        raise ValueError("prompt_len and output_len must be equally long lists of integers >= 1")
    arrivals = list(arrivals) if arrivals is not None else [0.0] * n
    if len(arrivals) != n or any(b < a for a, b in zip(arrivals, arrivals[1:])) or (n and arrivals[0] < 0):
        raise ValueError("arrivals must be non-decreasing times >= 0, one per request")
    return Workload(list(prompt_len), list(output_len), list(chains) if chains else [()] * n,
                    list(route_keys) if route_keys else [None] * n, arrivals, max_concurrency,
                    {"dataset": "synthetic", "requests": n})
