"""Speculative decoding: proposers (n-gram prompt lookup, a draft model) and lossless verification
in the target's normal step. The scheduler's num_computed_tokens rule covers it: a sequence with
k proposals computes k + 1 positions, accepted tokens advance it and rejected ones are recomputed
over (core/scheduler.py); how many to propose comes from core/spec_policy.py."""
