"""n-gram prompt lookup (vLLM's `ngram` method, llama.cpp's lookup decoding): no extra model.

The last n tokens of a sequence, n from max_n down to min_n, are looked up earlier in its prompt
and output; the tokens that followed the latest earlier occurrence are the proposal. Where a
passage is being copied or edited (code, a quoted document) this guesses many tokens at once; on
free text it mostly finds nothing, and nothing is proposed. Each sequence's n-grams are indexed
incrementally (a dict per n), so a step costs O(new tokens), not O(context). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Index:
    next_start: dict[int, int] = field(default_factory=dict)  # n -> first start not yet indexed
    latest: dict[tuple[int, ...], int] = field(default_factory=dict)  # n-gram -> its latest start


class NgramProposer:
    def __init__(self, min_n: int = 1, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"prompt_lookup_min must be in [1, prompt_lookup_max], got {min_n} and {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._indexes: dict[int, _Index] = {}  # seq_id -> its index

    def forget(self, seq_id: int) -> None:
        self._indexes.pop(seq_id, None)

    def propose(self, seq_id: int, token_ids: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
        token_ids (of min_n..max_n tokens) that occurred before."""
        num = len(token_ids)
        if k <= 0:
            return []
        index = self._indexes.setdefault(seq_id, _Index())
        for n in range(min(self.max_n, num - 1), self.min_n - 1, -1):
            # index the n-grams that start before the suffix's own start, num - n
            start = index.next_start.get(n, 0)
            for s in range(start, num - n):
                index.latest[tuple(token_ids[s:s + n])] = s
            index.next_start[n] = max(start, num - n)
            s = index.latest.get(tuple(token_ids[num - n:]))
            if s is not None:
                return token_ids[s + n:s + n + k]
        return []
