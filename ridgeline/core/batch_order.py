"""Prefix-aware ordering of an offline batch (BatchLLM, Zheng et al., 2024).

Given the whole batch up front, requests that share a prompt prefix are queued next to each
other, so the shared KV blocks are computed once, reused while they are still cached, and
freed soon after instead of being evicted and recomputed between scattered arrivals. Groups,
and requests inside a group, with a larger decode share (output tokens over total tokens)
go first: their long decodes then overlap with the prefill chunks of the requests behind them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BatchItem:
    prompt_ids: list[int]
    max_new_tokens: int


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def prefix_aware_order(items: list[BatchItem], min_shared_tokens: int) -> list[int]:
    """Indices of `items` in the order to submit them.

    Sorting the prompts lexicographically puts every set of prompts with a common prefix
    (nested ones too) in one contiguous run; a group is a maximal run whose members share at
    least `min_shared_tokens` (one KV block) with the run's first prompt.
    """
    by_tokens = sorted(range(len(items)), key=lambda i: items[i].prompt_ids)
    groups: list[list[int]] = []
    for i in by_tokens:
        if groups and _common_prefix(items[groups[-1][0]].prompt_ids, items[i].prompt_ids) >= min_shared_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])

    def decode_share(i: int) -> float:
        it = items[i]
        return it.max_new_tokens / (it.max_new_tokens + len(it.prompt_ids))

    for g in groups:
        g.sort(key=decode_share, reverse=True)
    groups.sort(key=lambda g: sum(decode_share(i) for i in g) / len(g), reverse=True)
    return [i for g in groups for i in g]
