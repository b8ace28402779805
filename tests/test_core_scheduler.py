"""The scheduler and block manager on plain data, without a model (in the style of vLLM's
tests/v1/core/test_scheduler.py): admission, the token budget, chunked prefill, preemption,
prefix-cache hits and pending prefix claims, forks, finishing, abort, prompt logprobs and
Hydragen's shared-prefix parts. A step is `schedule()`, a fake runner output with one token per
sampled row (and per fork candidate), then `update_from_output()`. Only ridgeline.core and
SamplingParams are used: no torch, no model, no tokenizer."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from ridgeline.core import (BlockManager, HydragenConfig, ModelRunnerOutput, Request, Scheduler, SchedulerConfig,
                            SchedulerOutput, SeqStatus, SeqUpdate)
from ridgeline.core.prefix_groups import SharedPrefix
from ridgeline.sampling_params import SamplingParams

BS = 4  # tokens per KV block in every test
EOS = 2
TOKEN = 7  # what the fake runner samples unless told otherwise

_request_ids = itertools.count()


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 8, max_num_batched_tokens: int = 64,
                   max_model_len: int = 1024, hydragen: HydragenConfig | None = None,
                   prefix_caching: bool = True) -> Scheduler:
    blocks = BlockManager(num_blocks, BS, prefix_caching)
    return Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens), blocks, max_model_len, [EOS], hydragen)


def add(sched: Scheduler, prompt: list[int], **params) -> Request:
    """Queue a greedy request (max_tokens 16 unless given)."""
    req = Request.create(f"r{next(_request_ids)}", prompt, SamplingParams(temperature=0.0, **params), base_seed=0)
    sched.add_request(req)
    return req


def prompt(n: int, first: int = 100) -> list[int]:
    return list(range(first, first + n))


def step(sched: Scheduler, token: int | dict[int, int] = TOKEN) -> tuple[SchedulerOutput, list[SeqUpdate]]:
    """One engine step with a fake runner: `token` (or token[seq_id]) for every sampled row and
    fork candidate, and a placeholder logprob for every prompt position asked for."""
    out = sched.schedule()
    result = ModelRunnerOutput()

    def tok(seq) -> int:
        return token[seq.seq_id] if isinstance(token, dict) else token

    for item in out.seqs:
        if item.sample:
            for seq in [item.seq, *item.fork_candidates]:
                result.sampled[seq.seq_id] = [tok(seq)]
        if item.prompt_logprobs is not None:
            first, last = item.prompt_logprobs
            result.prompt_logprobs[item.seq.seq_id] = [
                (item.seq.token_ids[p + 1], -1.0, 1, [], []) for p in range(first, last)]
    return out, sched.update_from_output(out, result)


def shape(out: SchedulerOutput) -> list[tuple[int, int, int, bool]]:
    """(seq_id, start, num_new_tokens, sample) per scheduled row, in the output's order."""
    return [(s.seq.seq_id, s.start, s.num_new_tokens, s.sample) for s in out.seqs]


def run_until_finished(sched: Scheduler, req: Request, tokens: list[int]) -> None:
    """Step, sampling tokens[k] at step k, until the request finishes (fails if it outlives them)."""
    for token in tokens:
        step(sched, token)
        if req.finished:
            return
    raise AssertionError(f"still running after {len(tokens)} steps: {req.seqs[0].output_token_ids}")


# ---------------------------------------------------------------------------------------- imports

def test_core_imports_without_torch():
    code = "import sys, ridgeline.core; assert 'torch' not in sys.modules, sorted(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------- budget

def test_token_budget_split_between_decodes_and_a_chunked_prefill():
    sched = make_scheduler(max_num_batched_tokens=16)
    a, b = add(sched, prompt(5)), add(sched, prompt(8, 200))
    step(sched)  # both prompts: 5 + 8 tokens
    sa, sb = a.seqs[0], b.seqs[0]
    assert (sa.num_computed_tokens, sb.num_computed_tokens, sa.num_tokens, sb.num_tokens) == (5, 8, 6, 9)
    c = add(sched, prompt(40, 300))
    sc = c.seqs[0]
    chunks, sizes = [], []
    for _ in range(3):
        out, _ = step(sched)
        assert out.num_decode_rows == 2
        chunks.append(shape(out))
        sizes.append(out.num_tokens)
    assert sizes == [16, 16, 14]
    # each step: the two decodes take one token each, the prompt the other 14 until its last 12
    assert chunks == [[(sa.seq_id, 5, 1, True), (sb.seq_id, 8, 1, True), (sc.seq_id, 0, 14, False)],
                      [(sa.seq_id, 6, 1, True), (sb.seq_id, 9, 1, True), (sc.seq_id, 14, 14, False)],
                      [(sa.seq_id, 7, 1, True), (sb.seq_id, 10, 1, True), (sc.seq_id, 28, 12, True)]]
    assert sc.num_computed_tokens == 40 and sc.output_token_ids == [TOKEN]


def test_decode_rows_come_first_in_the_output():
    """One-token rows (the last prompt token of a chunked prompt, a prompt whose prefix is cached)
    are placed before a prefill admitted ahead of them: the runner treats the leading one-token
    rows as the decode group."""
    sched = make_scheduler(max_num_batched_tokens=8)
    shared = prompt(8)
    p = add(sched, shared + [1])
    step(sched)  # an 8-token chunk: computes and caches the two full blocks of `shared`
    c = add(sched, prompt(5, 300))
    w = add(sched, shared + [3])  # 2 blocks cached: 1 token left
    out, _ = step(sched)
    sp, sc, sw = p.seqs[0], c.seqs[0], w.seqs[0]
    assert shape(out) == [(sp.seq_id, 8, 1, True), (sw.seq_id, 8, 1, True), (sc.seq_id, 0, 5, True)]
    assert out.num_decode_rows == 2 and out.num_tokens == 7


def test_a_full_budget_leaves_waiting_requests_waiting():
    sched = make_scheduler(max_num_batched_tokens=8)
    a, b = add(sched, prompt(8)), add(sched, prompt(3, 200))
    out, _ = step(sched)
    assert shape(out) == [(a.seqs[0].seq_id, 0, 8, True)]
    assert b.seqs[0].status is SeqStatus.WAITING and list(sched.waiting) == [b.seqs[0]]


# ---------------------------------------------------------------------------------------- admission

def test_max_num_seqs_limits_admission():
    sched = make_scheduler(max_num_seqs=2)
    reqs = [add(sched, prompt(3, 100 * i), max_tokens=2) for i in range(1, 4)]
    out, _ = step(sched)
    assert [s.seq for s in out.seqs] == [reqs[0].seqs[0], reqs[1].seqs[0]]
    assert sched.num_running == 2 and list(sched.waiting) == [reqs[2].seqs[0]]
    out, _ = step(sched)  # the first two finish (max_tokens=2); the third cannot join yet
    assert reqs[0].finished and reqs[1].finished and reqs[2].seqs[0].status is SeqStatus.WAITING
    out, _ = step(sched)
    assert shape(out) == [(reqs[2].seqs[0].seq_id, 0, 3, True)]


def test_admission_counts_every_sample_of_a_request():
    """A request with n=2 needs two places in the running set; while it does not fit, FCFS keeps
    the requests behind it waiting too."""
    sched = make_scheduler(max_num_seqs=4)
    r1 = add(sched, prompt(4), n=3)
    step(sched)
    assert sched.num_running == 3
    r2, r3 = add(sched, prompt(4, 200), n=2), add(sched, prompt(4, 300))
    out, _ = step(sched)
    assert [s.seq for s in out.seqs] == r1.seqs  # the three decodes only
    assert list(sched.waiting) == [r2.seqs[0], r3.seqs[0]]


def test_admission_counts_unforked_samples_of_admitted_requests():
    sched = make_scheduler(max_num_seqs=4)
    add(sched, prompt(4), n=3)
    r2 = add(sched, prompt(4, 200), n=2)
    step(sched)
    assert sched.num_running <= 4
    assert r2.seqs[0].status is SeqStatus.WAITING


# ---------------------------------------------------------------------------------------- chunked prefill

def test_chunked_prefill_advances_num_computed_tokens_exactly():
    sched = make_scheduler(max_num_batched_tokens=8)
    req = add(sched, prompt(20))
    seq = req.seqs[0]
    seen = []
    for _ in range(4):
        out, updates = step(sched)
        seen.append((shape(out), seq.num_computed_tokens, len(seq.block_table), [u.new_token_ids for u in updates]))
    sid = seq.seq_id
    assert seen == [([(sid, 0, 8, False)], 8, 2, []),
                    ([(sid, 8, 8, False)], 16, 4, []),
                    ([(sid, 16, 4, True)], 20, 5, [[TOKEN]]),
                    ([(sid, 20, 1, True)], 21, 6, [[TOKEN]])]  # the decode at position 20 takes block 6
    assert sched.num_prompt_tokens == 20 and sched.num_generation_tokens == 2


# ---------------------------------------------------------------------------------------- prefix cache

def test_prefix_cache_hit_skips_the_cached_blocks():
    sched = make_scheduler()
    a = add(sched, prompt(10))
    step(sched)  # a computes 10 tokens: blocks 0-1 (tokens 0-7) full and cached
    b = add(sched, prompt(8) + [1, 2, 3])
    out, _ = step(sched)
    sa, sb = a.seqs[0], b.seqs[0]
    assert (sb.seq_id, 8, 3, True) in shape(out)
    assert sb.block_table[:2] == sa.block_table[:2] and sb.block_table[2] not in sa.block_table
    assert (sched.blocks.num_cache_queries, sched.blocks.num_cache_hits) == (10 + 11, 8)
    assert sched.blocks.allocator.num_shared == 2


def test_prefix_cache_hit_leaves_the_last_prompt_token_to_compute():
    """A prompt that is exactly two cached blocks reuses only the first: the last token's logits
    give the first output token, so its block is computed again."""
    sched = make_scheduler()
    a = add(sched, prompt(10))
    step(sched)
    b = add(sched, prompt(8))
    out, _ = step(sched)
    sb = b.seqs[0]
    assert (sb.seq_id, 4, 4, True) in shape(out)
    assert sb.block_table[0] == a.seqs[0].block_table[0] and sb.block_table[1] != a.seqs[0].block_table[1]
    assert (sched.blocks.num_cache_queries, sched.blocks.num_cache_hits) == (18, 4)


def test_prefix_cache_hit_after_the_owner_finished():
    """Freed cached blocks wait in the evictable list and are found again."""
    sched = make_scheduler(num_blocks=8)
    a = add(sched, prompt(9), max_tokens=1)
    step(sched)
    assert a.finished and sched.blocks.allocator.num_used == 0
    b = add(sched, prompt(9))
    out, _ = step(sched)
    assert shape(out) == [(b.seqs[0].seq_id, 8, 1, True)]
    assert sched.blocks.allocator.num_used == 3 and sched.blocks.num_cache_hits == 8


def test_prefix_caching_off_computes_the_whole_prompt():
    sched = make_scheduler(prefix_caching=False)
    add(sched, prompt(10))
    step(sched)
    b = add(sched, prompt(8) + [1, 2, 3])
    out, _ = step(sched)
    assert (b.seqs[0].seq_id, 0, 11, True) in shape(out) and sched.blocks.num_cache_hits == 0


def test_request_sharing_a_prefix_waits_for_its_computation_then_hits():
    sched = make_scheduler()
    a = add(sched, prompt(8) + [1, 1])
    b = add(sched, prompt(8) + [2, 2, 2])
    c = add(sched, prompt(6, 500))  # unrelated: admitted past the deferred b
    sa, sb, sc = a.seqs[0], b.seqs[0], c.seqs[0]
    out, _ = step(sched)
    assert shape(out) == [(sa.seq_id, 0, 10, True), (sc.seq_id, 0, 6, True)]
    assert list(sched.waiting) == [sb]
    assert sched.pending_prefix[sb.block_hashes[0]] is sa
    out, _ = step(sched)
    assert shape(out)[2] == (sb.seq_id, 8, 3, True)
    assert sb.block_table[:2] == sa.block_table[:2]
    assert (sched.blocks.num_cache_queries, sched.blocks.num_cache_hits) == (10 + 6 + 11, 8)


# ---------------------------------------------------------------------------------------- preemption

def test_preemption_picks_the_newest_unscheduled_sequence():
    sched = make_scheduler(num_blocks=5, prefix_caching=False)
    a, b, c = add(sched, prompt(4)), add(sched, prompt(4, 200)), add(sched, prompt(8, 300))
    step(sched)  # blocks: a 1, b 1, c 2; one free
    sa, sb, sc = a.seqs[0], b.seqs[0], c.seqs[0]
    d = add(sched, prompt(3, 400))  # one block would be free for it after the preemption
    out, _ = step(sched)  # a takes the free block; b needs one: c, the newest, is preempted
    assert out.num_preempted == 1 and sched.num_preemptions == 1
    assert shape(out) == [(sa.seq_id, 4, 1, True), (sb.seq_id, 4, 1, True)]
    assert (sc.status, sc.num_computed_tokens, sc.block_table, sc.num_preemptions) == (SeqStatus.WAITING, 0, [], 1)
    assert sc.token_ids == prompt(8, 300) + [TOKEN]  # recomputed from its tokens later
    assert list(sched.waiting) == [sc, d.seqs[0]]  # at the front; d not admitted in a preempting step
    assert sched.blocks.allocator.num_free == 1 and sched.running == [sa, sb]


def test_a_preempted_sequence_recomputes_its_generated_tokens():
    sched = make_scheduler(num_blocks=5, prefix_caching=False)
    a, b, c = add(sched, prompt(4), max_tokens=2), add(sched, prompt(4, 200), max_tokens=2), add(sched, prompt(8, 300))
    step(sched)
    step(sched)  # c preempted; a and b finish
    assert a.finished and b.finished
    out, _ = step(sched)
    sc = c.seqs[0]
    assert shape(out) == [(sc.seq_id, 0, 9, True)] and sc.output_token_ids == [TOKEN, TOKEN]


def test_a_sequence_that_cannot_fit_preempts_itself():
    """When only the sequence itself is left unscheduled, it is the victim."""
    sched = make_scheduler(num_blocks=2, prefix_caching=False)
    a, b = add(sched, prompt(4)), add(sched, prompt(3, 200))
    step(sched)  # a: block 0, b: block 1
    out, _ = step(sched)  # a needs a second block; b (newest) goes; b's block suffices
    assert out.num_preempted == 1 and [s.seq for s in out.seqs] == [a.seqs[0]]
    out, _ = step(sched)  # a decodes in its 2 blocks; b waits (no block)
    assert [s.seq for s in out.seqs] == [a.seqs[0]] and b.seqs[0].status is SeqStatus.WAITING
    for _ in range(2):
        step(sched)
    out, _ = step(sched)  # a at 9 tokens needs a third block: only itself to preempt
    assert out.num_preempted == 1 and out.seqs == [] and list(sched.waiting) == [a.seqs[0], b.seqs[0]]


# ---------------------------------------------------------------------------------------- forks

def test_fork_shares_full_blocks_and_copies_the_partial_one_next_step():
    sched = make_scheduler()
    req = add(sched, prompt(6), n=3)
    parent, c1, c2 = req.seqs
    out, updates = step(sched)
    assert [s.fork_candidates for s in out.seqs] == [[c1, c2]] and out.blocks_to_copy == []
    assert [u.seq for u in updates] == [parent, c1, c2] and all(u.new_token_ids == [TOKEN] for u in updates)
    assert sched.running == [parent, c1, c2] and req.unforked == []
    full, partial = parent.block_table
    assert [c1.block_table[0], c2.block_table[0]] == [full, full]
    assert sched.blocks.allocator.ref_counts[full] == 3 and sched.blocks.allocator.num_shared == 1
    assert len({partial, c1.block_table[1], c2.block_table[1]}) == 3
    assert (c1.num_computed_tokens, c2.num_computed_tokens) == (6, 6)
    out, _ = step(sched)
    assert out.blocks_to_copy == [(partial, c1.block_table[1]), (partial, c2.block_table[1])]
    assert shape(out) == [(s.seq_id, 6, 1, True) for s in (parent, c1, c2)]
    out, _ = step(sched)
    assert out.blocks_to_copy == []


def test_fork_without_a_free_block_queues_the_sample():
    sched = make_scheduler(num_blocks=2)
    req = add(sched, prompt(6), n=2, max_tokens=1)
    parent, child = req.seqs
    _, updates = step(sched)  # the prompt fills both blocks: no block for the child's copy
    assert [u.seq for u in updates] == [parent] and parent.finish_reason == "length"
    assert (child.status, child.token_ids, child.block_table) == (SeqStatus.WAITING, prompt(6), [])
    assert list(sched.waiting) == [child] and req.unforked == []
    out, _ = step(sched)  # admitted as an ordinary sequence, from the cached full block
    assert shape(out) == [(child.seq_id, 4, 2, True)] and out.blocks_to_copy == []
    assert req.finished and child.output_token_ids == [TOKEN]


def test_fork_waits_for_the_last_prompt_chunk():
    sched = make_scheduler(max_num_batched_tokens=8)
    req = add(sched, prompt(12), n=2)
    out, _ = step(sched)
    assert [s.fork_candidates for s in out.seqs] == [[]] and sched.num_running == 1
    out, _ = step(sched)
    assert [s.fork_candidates for s in out.seqs] == [[req.seqs[1]]] and sched.num_running == 2
    assert out.blocks_to_copy == [] and req.seqs[1].block_table == req.seqs[0].block_table[:3]


# ---------------------------------------------------------------------------------------- finishing

def test_finish_on_max_tokens():
    sched = make_scheduler()
    req = add(sched, prompt(5), max_tokens=3)
    run_until_finished(sched, req, [TOKEN] * 5)
    seq = req.seqs[0]
    assert (seq.finish_reason, seq.stop_reason, seq.output_token_ids) == ("length", None, [TOKEN] * 3)
    assert sched.blocks.allocator.num_used == 0 and sched.running == []
    out, _ = step(sched)
    assert out.finished_seq_ids == [seq.seq_id] and out.seqs == []


def test_finish_on_eos():
    sched = make_scheduler()
    req = add(sched, prompt(5))
    run_until_finished(sched, req, [TOKEN, EOS, TOKEN])
    assert (req.seqs[0].finish_reason, req.seqs[0].stop_reason, req.seqs[0].output_token_ids) == ("stop", None, [TOKEN, EOS])


def test_eos_before_min_tokens_does_not_finish():
    sched = make_scheduler()
    req = add(sched, prompt(5), min_tokens=3)
    run_until_finished(sched, req, [EOS, EOS, EOS, TOKEN])
    assert (req.seqs[0].finish_reason, req.seqs[0].output_token_ids) == ("stop", [EOS, EOS, EOS])


def test_ignore_eos_runs_to_max_tokens():
    sched = make_scheduler()
    req = add(sched, prompt(5), ignore_eos=True, max_tokens=4)
    run_until_finished(sched, req, [EOS] * 6)
    assert (req.seqs[0].finish_reason, req.seqs[0].output_token_ids) == ("length", [EOS] * 4)


def test_finish_on_stop_token_ids():
    sched = make_scheduler()
    req = add(sched, prompt(5), stop_token_ids=[11], ignore_eos=True, min_tokens=2)
    run_until_finished(sched, req, [11, EOS, 11, TOKEN])  # the first 11 is under min_tokens
    assert (req.seqs[0].finish_reason, req.seqs[0].stop_reason, req.seqs[0].output_token_ids) == \
        ("stop", 11, [11, EOS, 11])


def test_finish_at_max_model_len():
    sched = make_scheduler(max_model_len=8)
    req = add(sched, prompt(6), max_tokens=None)
    run_until_finished(sched, req, [TOKEN] * 4)
    assert (req.seqs[0].finish_reason, req.seqs[0].num_tokens) == ("length", 8)


def test_finish_seq_with_a_stop_string_after_the_step():
    """The output processor finds stop strings and calls finish_seq; the blocks are freed."""
    sched = make_scheduler()
    req = add(sched, prompt(5))
    step(sched)
    sched.finish_seq(req.seqs[0], "stop", "###")
    assert (req.seqs[0].finish_reason, req.seqs[0].stop_reason, req.finished) == ("stop", "###", True)
    assert sched.blocks.allocator.num_used == 0 and sched.schedule().finished_seq_ids == [req.seqs[0].seq_id]


# ---------------------------------------------------------------------------------------- abort

def test_abort_frees_every_block_and_reports_the_sequences():
    sched = make_scheduler()
    running = add(sched, prompt(9), n=3)
    deferred = add(sched, prompt(9) + [5])  # waits on running's prefix claim
    step(sched)
    pending = add(sched, prompt(80, 300), n=2)  # admitted in the next step, chunked: not yet forked
    step(sched)
    assert sched.blocks.allocator.num_used > 0 and pending.unforked == [pending.seqs[1]]
    for req in (running, deferred, pending):
        sched.abort_request(req)
    assert sched.blocks.allocator.num_used == 0 and sched.running == [] and list(sched.waiting) == []
    assert sched.pending_prefix == {} and all(s.finish_reason == "abort" for r in (running, deferred, pending)
                                              for s in r.seqs)
    out, _ = step(sched)
    assert out.seqs == [] and sorted(out.finished_seq_ids) == sorted(
        s.seq_id for r in (running, deferred, pending) for s in r.seqs)
    assert sched.schedule().finished_seq_ids == []


def test_abort_of_the_prefix_owner_lets_the_waiting_request_compute_it():
    sched = make_scheduler(max_num_batched_tokens=8)
    a = add(sched, prompt(8) + [1] * 8)
    b = add(sched, prompt(8) + [2])
    step(sched)  # a's first chunk: 8 tokens, budget spent
    sched.abort_request(a)
    out, _ = step(sched)
    assert shape(out) == [(b.seqs[0].seq_id, 8, 1, True)]  # a's computed blocks stayed cached


# ---------------------------------------------------------------------------------------- prompt logprobs

def test_prompt_logprobs_skip_the_prefix_cache_and_report_every_position_once():
    sched = make_scheduler(max_num_batched_tokens=8)
    add(sched, prompt(20), max_tokens=1)
    for _ in range(3):
        step(sched)  # 20 prompt tokens cached
    hits = sched.blocks.num_cache_hits
    req = add(sched, prompt(20), prompt_logprobs=2)
    seq = req.seqs[0]
    ranges, reported = [], []
    for _ in range(3):
        out, updates = step(sched)
        ranges.append((out.seqs[0].start, out.seqs[0].num_new_tokens, out.seqs[0].prompt_logprobs))
        reported += [lp[0] for u in updates for lp in (u.prompt_logprobs or [])]
    assert ranges == [(0, 8, (0, 8)), (8, 8, (8, 16)), (16, 4, (16, 19))]
    assert reported == prompt(20)[1:]  # positions 1..19, each once
    assert req.num_prompt_logprobs == 20 and sched.blocks.num_cache_hits == hits
    assert seq.output_token_ids == [TOKEN]


# ---------------------------------------------------------------------------------------- Hydragen

def test_shared_prefixes_of_forked_decode_rows():
    sched = make_scheduler(hydragen=HydragenConfig(min_saved_tokens=16, min_saved_fraction=0.5))
    req = add(sched, prompt(13), n=3)
    out, _ = step(sched)
    assert out.shared_prefixes == []  # a prefill step
    out, _ = step(sched)
    parent = req.seqs[0]
    # 3 rows share 3 full blocks: (3 - 1) x 12 tokens saved >= 16, and 6 of 9 full blocks >= half
    assert out.shared_prefixes == [SharedPrefix(rows=[0, 1, 2], blocks=parent.block_table[:3])]
    assert out.own_start_blocks == [3, 3, 3] and sched.num_hydragen_steps == 1 and sched.num_steps == 2


def test_no_shared_prefixes_below_the_policy_or_without_it():
    for hydragen in (HydragenConfig(min_saved_tokens=25), None):
        sched = make_scheduler(hydragen=hydragen)
        add(sched, prompt(13), n=3)
        step(sched)
        out, _ = step(sched)
        assert (out.shared_prefixes, out.own_start_blocks, sched.num_hydragen_steps) == ([], [], 0), hydragen


def test_shared_prefixes_from_prefix_cache_hits_across_requests():
    sched = make_scheduler(hydragen=HydragenConfig(min_saved_tokens=8))
    system = prompt(8)
    reqs = [add(sched, system + [i, i]) for i in (1, 2, 3)]
    step(sched)  # the first computes the system prompt; the others wait on its claim
    step(sched)  # the others hit it
    out, _ = step(sched)
    assert out.num_decode_rows == 3
    assert out.shared_prefixes == [SharedPrefix(rows=[0, 1, 2], blocks=reqs[0].seqs[0].block_table[:2])]
    assert out.own_start_blocks == [2, 2, 2]
