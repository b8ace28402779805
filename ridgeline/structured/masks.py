"""GrammarMasks: one llguidance matcher per constrained sequence, and each step's token masks.

A matcher's state is a function of its sequence's output tokens: before a mask is computed the
matcher consumes the tokens its sequence gained since the last one (the tokens emitted last step),
and a sequence that lost tokens it had consumed gets a fresh matcher that replays them. So preemption
(recompute keeps the tokens), forked samples (n > 1: a fresh matcher per sample) and prefix
caching need nothing special, and a step's masks depend only on the tokens, never on timing.

`start()` computes the step's masks in a worker thread while the forward pass runs (llguidance
releases the GIL while it computes a mask), or inline for a step with only a few constrained rows;
`result()` waits for them. A speculative row gets a
mask after each of its proposals as well (the matcher advanced through them, then rolled back),
so verification runs against the masked target distribution: a proposal the grammar refuses has
probability 0 there and is always rejected, and the token drawn in its place is allowed. EOS is allowed only where
the grammar accepts (llguidance adds it to the mask there). A sequence whose grammar allows no
token at all (the matcher hit an error, or a dead end the compiler could not see) is reported
in `GrammarMasks.Step.errors` instead of being sampled, so it ends with finish_reason
"grammar_error" rather than decoding garbage or running forever.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import llguidance
import llguidance.hf
import numpy as np
import torch

from .params import StructuredOutputsParams

log = logging.getLogger("ridgeline")
MAX_TEMPLATES = 64  # compiled grammars kept for reuse (requests with the same schema)
OVERLAP_MIN_ROWS = 8  # constrained rows in a step from which their masks are computed during the forward


@dataclass
class _State:
    matcher: llguidance.LLMatcher
    num_consumed: int = 0  # output tokens the matcher has consumed


@dataclass
class MaskRequest:
    """One row to mask: its sequence, constraint and tokens (read in the worker thread: the runner
    does not change them while the forward runs)."""

    seq_id: int
    params: StructuredOutputsParams
    token_ids: list[int]
    num_prompt_tokens: int
    draft: list[int] = field(default_factory=list)  # speculative proposals: a mask after each of them too


@dataclass
class MaskResult:
    bias: torch.Tensor  # [rows, vocab] float32, 0 where allowed, -inf elsewhere: 1 + len(draft) rows per request
    first: list[int]  # each request's first row
    errors: dict[int, str] = field(default_factory=dict)  # request -> why no token is allowed at its first row

    def rows(self, request: int) -> torch.Tensor:
        end = self.first[request + 1] if request + 1 < len(self.first) else self.bias.shape[0]
        return self.bias[self.first[request]:end]


class GrammarMasks:
    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_ids: list[int], overlap: bool = True):
        self._hf_tokenizer = hf_tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self._eos = frozenset(eos_token_ids)
        self.overlap = overlap  # False: masks computed in the calling thread (same results, for tests)
        # Fewer rows are computed inline: a mask costs ~15-80 us here, less than waking the worker on
        # a busy machine (measured: batch 1 overlapped was slower than inline on a loaded 2-core VM).
        self.overlap_min_rows = OVERLAP_MIN_ROWS
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._states: dict[int, _State] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._words = (vocab_size + 31) // 32
        self._lock = threading.Lock()  # the tokenizer and templates: the engine, mask and warm-up threads

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary, built on first use (~0.5 s for 49k tokens)."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, self.vocab_size,
                                                               eos_token=self.eos_token_ids or None)
            return self._tokenizer

    def warm_up(self) -> None:
        """Build the tokenizer in a background thread (the server calls this at start, so the first
        constrained request does not pause every stream for it)."""
        threading.Thread(target=lambda: self.tokenizer, name="ridgeline-grammar-warmup", daemon=True).start()

    def template(self, params: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The grammar compiled for this vocabulary, in its initial state (never advanced: each
        sequence deep-copies it). Raises ValueError naming the field if it does not compile."""
        key = params.llg_grammar
        tokenizer = self.tokenizer
        with self._lock:
            m = self._templates.get(key)
            if m is not None:
                self._templates.move_to_end(key)
                return m
        m = llguidance.LLMatcher(tokenizer, key, log_level=0)
        if m.is_error():
            raise ValueError(f"{params.field_name}.{params.kind} is invalid: {' '.join(m.get_error().split())}")
        with self._lock:
            self._templates[key] = m
            if len(self._templates) > MAX_TEMPLATES:
                self._templates.popitem(last=False)
        return m

    def forget(self, seq_id: int) -> None:
        self._states.pop(seq_id, None)

    def start(self, rows: list[MaskRequest]) -> Future | MaskResult:
        """Begin computing the rows' masks: in the worker thread when overlapping and there are
        enough of them, else now."""
        if not self.overlap or sum(1 + len(r.draft) for r in rows) < self.overlap_min_rows:
            return self._compute(rows)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ridgeline-grammar")
        return self._pool.submit(self._compute, rows)

    @staticmethod
    def result(pending: Future | MaskResult) -> MaskResult:
        return pending.result() if isinstance(pending, Future) else pending

    def _sync(self, row: MaskRequest) -> _State:
        """The row's matcher, advanced to its sequence's output tokens (rebuilt from the start if
        the sequence lost tokens it had consumed)."""
        out = row.token_ids[row.num_prompt_tokens:]
        state = self._states.get(row.seq_id)
        if state is None or state.num_consumed > len(out):
            state = self._states[row.seq_id] = _State(self.template(row.params).deep_copy())
        m = state.matcher
        for t in out[state.num_consumed:]:
            if t in self._eos and m.is_accepting():
                continue  # EOS that did not end the sequence (min_tokens): the grammar stays complete
            m.consume_token(t)
        state.num_consumed = len(out)
        return state

    def _compute(self, rows: list[MaskRequest]) -> MaskResult:
        first = [0]
        for row in rows[:-1]:
            first.append(first[-1] + 1 + len(row.draft))
        words = np.zeros((first[-1] + 1 + len(rows[-1].draft), self._words), dtype=np.int32)
        errors: dict[int, str] = {}
        for i, row in enumerate(rows):
            m = self._sync(row).matcher
            r = first[i]
            if not m.is_error():
                m.unsafe_compute_mask_ptr(words[r].ctypes.data, words[r].nbytes)
            if m.is_error() or not words[r].any():
                why = (m.get_error() or "").split("<state>")[0].strip()  # llguidance appends its parser state
                errors[i] = " ".join(f"the grammar allows no further token{f' ({why})' if why else ''}".split())
                log.warning("structured outputs: sequence %d: %s", row.seq_id, errors[i])
                continue
            if row.draft:
                self._draft_masks(m, row.draft, words[r:r + 1 + len(row.draft)])
        bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :self.vocab_size]
        # an additive bias: adding it is ~15x faster on CPU than masked_fill with a boolean mask
        bias = torch.from_numpy(np.ascontiguousarray(bits)).float().sub_(1).mul_(float("inf"))
        bias.nan_to_num_(nan=0.0, posinf=0.0, neginf=float("-inf"))  # (1 - 1) * inf is nan: allowed
        return MaskResult(bias, first, errors)

    def _draft_masks(self, m: llguidance.LLMatcher, draft: list[int], words: np.ndarray) -> None:
        """words[j + 1]: the mask after proposals draft[:j + 1], words[0] being the current one.
        Consumed only up to the first proposal the grammar refuses (verification rejects it, so
        later rows are never sampled: they keep the last mask), then rolled back."""
        consumed = 0
        for j, d in enumerate(draft):
            allowed = bool((int(words[j, d >> 5]) >> (d & 31)) & 1)
            if not allowed or d in self._eos or not m.consume_token(d) or m.is_error():
                words[j + 1:] = words[j]
                break
            consumed += 1
            m.unsafe_compute_mask_ptr(words[j + 1].ctypes.data, words[j + 1].nbytes)
        if consumed:
            m.rollback(consumed)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
