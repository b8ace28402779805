"""Request and sequence state.

A Request is what the user submitted; it owns n Sequences (one per sample). Each
Sequence has `token_ids` (prompt + generated) and `num_computed_tokens`, the count whose
KV is in the cache. The scheduler only ever moves num_computed_tokens towards
len(token_ids); prefill, chunked prefill, decode and recompute after preemption are all that.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from .outputs import CompletionOutput, PositionLogprobs, RequestOutput
from .sampling_params import SamplingParams
from .tokenizer import IncrementalDetokenizer

_seq_counter = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: "Request"
    index: int
    token_ids: list[int]
    num_prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache hash chain of full blocks
    num_cached_blocks: int = 0  # leading blocks registered in the prefix cache
    text: str = ""
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_pending_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def visible_text(self) -> str:
        """Text safe to show now: while running, hold back a tail that could still start a stop string."""
        stops = self.request.params.stop_strings
        if self.finished or not stops:
            return self.text
        hold = max(len(s) for s in stops) - 1
        return self.text[:len(self.text) - hold] if hold > 0 else self.text


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    unforked: list[Sequence] = field(default_factory=list)  # samples 1..n-1 until the prompt is computed
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def to_output(self) -> RequestOutput:
        outs = []
        for s in self.seqs:
            outs.append(CompletionOutput(
                index=s.index,
                text=s.visible_text(),
                token_ids=list(s.output_token_ids),
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            ))
        metrics = {"arrival_time": self.arrival_time}
        if self.first_token_time is not None:
            metrics["first_token_time"] = self.first_token_time
        if self.finish_time is not None:
            metrics["finish_time"] = self.finish_time
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            outputs=outs,
            finished=self.finished,
            metrics=metrics,
        )
