"""Request and sequence scheduling state (torch-free).

A Request is what the user submitted; it owns n Sequences (one per sample). Each Sequence has
`token_ids` (prompt + generated) and `num_computed_tokens`, the count whose KV is in the cache.
The scheduler only ever moves num_computed_tokens towards len(token_ids); prefill, chunked
prefill, decode and recompute after preemption are all that. Text, logprobs and detokenizer
state live in the output processor; the sampler's random generators in the model runner.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from ..sampling_params import SamplingParams

_seq_counter = itertools.count()


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # sample number within the request
    token_ids: list[int]
    num_prompt_tokens: int
    seed: int  # of the sampler's generator for this sample
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache hash chain of full blocks
    num_cached_blocks: int = 0  # leading blocks registered in the prefix cache
    # speculative decoding: tokens proposed after token_ids, verified in the next step
    spec_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    num_preemptions: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

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


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seqs: list[Sequence] = field(default_factory=list)
    unforked: list[Sequence] = field(default_factory=list)  # samples 1..n-1 until the prompt is computed
    # prompt positions whose logprobs are recorded (position 0 has none, so it starts at 1);
    # None: prompt_logprobs not asked for
    num_prompt_logprobs: int | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @classmethod
    def create(cls, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               base_seed: int) -> Request:
        """A request with its n samples; sample i's generator seed is base_seed + i * 1,000,003."""
        req = cls(request_id, list(prompt_token_ids), params,
                  num_prompt_logprobs=1 if params.prompt_logprobs is not None else None)
        for i in range(params.n):
            req.seqs.append(Sequence(request=req, index=i, token_ids=list(prompt_token_ids),
                                     num_prompt_tokens=len(prompt_token_ids), seed=base_seed + i * 1_000_003))
        # Samples 1..n-1 fork from sample 0 once the prompt is computed, sharing its KV blocks.
        req.unforked = req.seqs[1:]
        return req

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)
