"""EngineStats: the engine's counters (since start) and gauges (now), one typed snapshot that
/metrics, LLM users and benchmarks read instead of engine internals."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    # counters
    num_steps: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0  # prompt tokens computed (recomputation after preemption included)
    generation_tokens: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    hydragen_steps: int = 0  # steps whose decode attention had shared-prefix parts
    spec_decode_num_drafts: int = 0  # speculative rows verified (a sequence with proposals, in a step)
    spec_decode_num_draft_tokens: int = 0  # proposed tokens verified
    spec_decode_num_accepted_tokens: int = 0
    # gauges
    num_requests: int = 0  # unfinished requests
    num_requests_running: int = 0  # with a sequence in the running set
    num_requests_waiting: int = 0  # unfinished, none of their sequences running
    num_seqs_running: int = 0
    num_seqs_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_shared: int = 0  # referenced by more than one sequence (prefix hits, forks)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / max(1, self.prefix_cache_queries)

    @property
    def spec_decode_acceptance_rate(self) -> float:
        return self.spec_decode_num_accepted_tokens / max(1, self.spec_decode_num_draft_tokens)

    @property
    def spec_decode_mean_accepted_length(self) -> float:
        """Tokens a speculative row yields on average: its accepted proposals and the one after."""
        return 1 + self.spec_decode_num_accepted_tokens / max(1, self.spec_decode_num_drafts)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / max(1, self.kv_blocks_total)
