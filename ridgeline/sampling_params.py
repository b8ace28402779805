"""Per-request sampling settings, validated on construction (names and defaults follow vLLM)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .structured.params import StructuredOutputsParams


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    logprobs: int | None = None  # number of top alternatives per generated token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # a JSON schema, JSON object, regex, choice or grammar the output must match (a dict of
    # StructuredOutputsParams' fields is accepted too)
    structured_outputs: StructuredOutputsParams | dict | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def fail(name: str, allowed: str) -> None:
            raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        if not is_int(self.n) or self.n < 1:
            fail("n", "an integer >= 1")
        if not is_num(self.temperature) or self.temperature < 0:
            fail("temperature", ">= 0 (0 means greedy)")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "in (0, 1]")
        if not is_int(self.top_k) or self.top_k < -1:
            fail("top_k", "an integer >= 1, or 0 / -1 to disable")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "in [0, 1]")
        if self.seed is not None and not is_int(self.seed):
            fail("seed", "an integer or None")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2 <= v <= 2:
                fail(name, "in [-2, 2]")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "> 0 (1 disables it)")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            fail("max_tokens", "an integer >= 1 or None")
        if not is_int(self.min_tokens) or self.min_tokens < 0 or (
                self.max_tokens is not None and self.min_tokens > self.max_tokens):
            fail("min_tokens", "an integer in [0, max_tokens]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or not 0 <= v <= 20):
                fail(name, "an integer in [0, 20] or None")
        if isinstance(self.stop, str):
            stops = [self.stop]
        elif self.stop is None:
            stops = []
        elif isinstance(self.stop, (list, tuple)) and all(isinstance(s, str) for s in self.stop):
            stops = list(self.stop)
        else:
            fail("stop", "a string or a list of strings")
        if any(s == "" for s in stops):
            fail("stop", "non-empty strings")
        self.stop_strings = stops
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif not isinstance(self.stop_token_ids, (list, tuple)) or not all(
                is_int(t) and t >= 0 for t in self.stop_token_ids):
            fail("stop_token_ids", "a list of non-negative integers")
        self.stop_token_ids = list(self.stop_token_ids)
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)
        if self.temperature < 1e-5:  # greedy: the other sampling knobs are moot
            self.temperature = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
