"""Synthetic benchmark datasets, generated locally and deterministically from a seed.

The client talks to any OpenAI-compatible server and may not have its tokenizer, so prompts
are built from a list of common English words, each a single token in the usual BPE
vocabularies when preceded by a space: lengths are given in words and are close to tokens.
The token counts reported come from the server's `usage` when it sends one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their has been if more when will would who so no out up into "
    "do any your what some can time only other new about than may its also these two first after like over "
    "such most them then make well where year way even back good through people just many those how work "
    "long each should state world life great still under never last day might while part school same high "
    "right place small found house both between number home old system water city form end family country "
    "point group hand large light program next story plan line river game word music study paper green "
    "north south east west early open close table road field stone book night morning summer winter market"
).split()


@dataclass
class BenchRequest:
    """One request of a dataset: a completion prompt or a chat conversation, and its output budget."""

    prompt: str | None
    messages: list[dict] | None
    input_len: int  # in words (approximately tokens)
    output_len: int
    meta: dict = field(default_factory=dict)

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _length(rng: random.Random, mean: int, range_ratio: float) -> int:
    """Uniform in [mean * (1 - r), mean * (1 + r)], at least 1 (vLLM's --random-range-ratio)."""
    lo, hi = max(1, round(mean * (1 - range_ratio))), max(1, round(mean * (1 + range_ratio)))
    return rng.randint(lo, hi)


def random_dataset(num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   seed: int = 0, text: bool = True) -> list[BenchRequest]:
    """Independent prompts with lengths drawn around input_len / output_len.

    text=False draws the lengths only (prompt None), as the serving simulator needs them: the
    same distributions without generating the words."""
    _check(num_prompts=num_prompts, input_len=input_len, output_len=output_len)
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    out = []
    for _ in range(num_prompts):
        n_in = _length(rng, input_len, range_ratio)
        out.append(BenchRequest(_words(rng, n_in) if text else None, None, n_in,
                                _length(rng, output_len, range_ratio)))
    return out


def prefix_repetition_dataset(num_prompts: int, prefix_len: int, suffix_len: int, num_prefixes: int,
                              output_len: int, seed: int = 0, text: bool = True) -> list[BenchRequest]:
    """Prompts sharing one of `num_prefixes` long prefixes, each with its own suffix (prefix-cache workloads).
    text=False: lengths and prefix ids only."""
    _check(num_prompts=num_prompts, prefix_len=prefix_len, num_prefixes=num_prefixes, output_len=output_len)
    if suffix_len < 0:
        raise ValueError(f"suffix_len must be >= 0, got {suffix_len}")
    rng = random.Random(seed)
    prefixes = [_words(rng, prefix_len) if text else "" for _ in range(num_prefixes)]
    out = []
    for i in range(num_prompts):
        k = i % num_prefixes
        suffix = _words(rng, suffix_len) if text else ""
        prompt = (f"{prefixes[k]} {suffix}" if suffix else prefixes[k]) if text else None
        out.append(BenchRequest(prompt, None, prefix_len + suffix_len, output_len, {"prefix": k}))
    rng.shuffle(out)
    return out


def multi_turn_dataset(num_conversations: int, turns: int, system_len: int, user_len: int,
                       assistant_len: int, output_len: int, seed: int = 0, text: bool = True) -> list[BenchRequest]:
    """Chat requests sharing one system prompt; turn t of a conversation carries its t - 1 earlier turns.

    Earlier assistant replies are synthetic (fixed text), so requests are independent of one
    another's outputs and may be sent in any order or concurrently. text=False: lengths and
    (conversation, turn) only, messages None.
    """
    _check(num_conversations=num_conversations, turns=turns, user_len=user_len, output_len=output_len)
    if system_len < 0 or assistant_len < 0:
        raise ValueError("system_len and assistant_len must be >= 0")
    rng = random.Random(seed)
    if not text:
        return [BenchRequest(None, None, system_len + (t + 1) * user_len + t * assistant_len, output_len,
                             {"conversation": c, "turn": t})
                for c in range(num_conversations) for t in range(turns)]
    system = _words(rng, system_len)
    out = []
    for c in range(num_conversations):
        history: list[dict] = [{"role": "system", "content": system}] if system_len else []
        for t in range(turns):
            history = history + [{"role": "user", "content": _words(rng, user_len)}]
            n_in = system_len + (t + 1) * user_len + t * assistant_len
            out.append(BenchRequest(None, list(history), n_in, output_len, {"conversation": c, "turn": t}))
            history = history + [{"role": "assistant", "content": _words(rng, assistant_len)}]
    return out


def _check(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
