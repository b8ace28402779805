"""The serving simulator against independent computations: step times from PerfModel, and the
engine's own Scheduler driven through its public API on the same workload."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ridgeline.bench.metrics import max_concurrency_observed
from ridgeline.core import (BlockManager, CacheConfig, HydragenConfig, ModelRunnerOutput, Request, Scheduler,
                            SchedulerConfig)
from ridgeline.core.config import MIN_SAVED_TOKENS_TORCH
from ridgeline.core.prefix_groups import find_shared_prefixes
from ridgeline.perf import HardwareSpecError, SeqWork, StepShape
from ridgeline.sampling_params import SamplingParams
from ridgeline.sim import (SimConfig, Simulator, StepTimer, WorkloadSpec, build_perf_model, build_workload, records,
                           simulate, summarize, synthetic_workload)
from ridgeline.sim.cli import add_arguments, run_from_args

MODEL = str(Path(__file__).resolve().parent.parent / "examples" / "llama3-8b-config.json")
HW = "h100-sxm"


def cfg(**kw) -> SimConfig:
    base = dict(model=MODEL, hardware=HW)
    base.update(kw)
    return SimConfig.from_kwargs(**base)


@pytest.fixture(scope="module")
def pm():
    return build_perf_model(cfg())


def step(pm, *seqs: tuple[int, int, bool]) -> float:
    return pm.step_time(StepShape([SeqWork(n, c, s) for n, c, s in seqs]))


# ---------------------------------------------------------------- timing of one request

def test_step_timer_matches_perf_model(pm):
    timer = StepTimer(pm, 2048, 256)
    assert timer.fast
    for v in [(1, 1, 1, 10.0, 10.0), (2048, 5, 3, 1e6, 3e4), (300, 256, 256, 5e5, 2e5)]:
        assert timer.time(*v) == pytest.approx(pm.step_time_vector(v), rel=1e-12)
    # A run of decode steps is the sum of the individual steps.
    k, end, _ = timer.decode_run(7, 7 * 101.0, 5, 0.0)
    assert k == 5
    assert end == pytest.approx(sum(pm.step_time_vector((7, 7, 7, 7 * 101.0 + 7 * j, 7 * 101.0 + 7 * j))
                                    for j in range(5)), rel=1e-12)
    # Stops before the step whose new blocks do not fit, and after the step ending past `until`.
    counts = [0] * 16
    counts[-3 % 16] = 4  # step 3 needs 4 new blocks
    assert timer.decode_run(7, 700.0, 10, 0.0, avail=3, block_counts=counts, step0=0)[0] == 3
    first = pm.step_time_vector((7, 7, 7, 700.0, 700.0))
    assert timer.decode_run(7, 700.0, 10, 0.0, until=first * 1.5)[0] == 2
    # Without the tables (a perf model whose internals changed) the times are the same.
    slow = StepTimer(pm, 2048, 256)
    slow._fast = False
    assert slow.decode_run(7, 700.0, 5, 0.0)[1] == pytest.approx(timer.decode_run(7, 700.0, 5, 0.0)[1], rel=1e-12)
    # Hydragen: `saved` fewer KV positions read (same pairs) while the blocks used stay <= saved_until.
    counts = [0] * 16
    counts[-2 % 16] = 7  # step 2 allocates a block for each row
    # And pay their parts' dispatch cost while the saving is on.
    k, end, used = timer.decode_run(7, 7 * 101.0, 5, 0.0, avail=100, block_counts=counts, step0=0, saved=600.0,
                                    saved_until=6, parts=3)
    assert (k, used) == (5, 7)
    expect = [pm.step_time_vector((7, 7, 7, 7 * 101.0 + 7 * j, 7 * 101.0 + 7 * j - (600 if j < 2 else 0)),
                                  3 if j < 2 else 0) for j in range(5)]
    assert pm.shared_part_overhead_s > 0
    assert end == pytest.approx(sum(expect), rel=1e-12)
    assert slow.decode_run(7, 7 * 101.0, 5, 0.0, avail=100, block_counts=counts, saved=600.0,
                           saved_until=6, parts=3)[1] == pytest.approx(sum(expect), rel=1e-12)
    for v, parts in [((8, 8, 8, 1e4, 5e3), 2), ((300, 256, 256, 5e5, 2e5), 5)]:
        assert timer.time(*v, parts) == pytest.approx(pm.step_time_vector(v, parts), rel=1e-12)
        assert slow.time(*v, parts) == pytest.approx(pm.step_time_vector(v, parts), rel=1e-12)


def test_single_request_ttft_and_tpot_from_the_perf_model(pm):
    p, o = 300, 6
    r = simulate(cfg(), synthetic_workload([p], [o]), pm)
    ttft = step(pm, (p, 0, True))
    decodes = [step(pm, (1, p + j, True)) for j in range(o - 1)]
    assert r.first_token[0] == pytest.approx(ttft, rel=1e-9)
    assert r.finish[0] - r.first_token[0] == pytest.approx(sum(decodes), rel=1e-9)
    m, summary = summarize(r)
    assert m.tpot_ms.mean == pytest.approx(1000 * sum(decodes) / (o - 1), rel=1e-9)
    assert summary["replicas"][0]["steps"] == o  # one prefill step, o - 1 decode steps


def test_chunked_prefill_splits_a_long_prompt_into_budget_sized_steps(pm):
    p = 5000
    r = simulate(cfg(max_num_batched_tokens=2048), synthetic_workload([p], [2]), pm)
    chunks = step(pm, (2048, 0, False)) + step(pm, (2048, 2048, False)) + step(pm, (904, 4096, True))
    assert r.first_token[0] == pytest.approx(chunks, rel=1e-9)
    assert r.replica_stats[0].steps == 4  # three chunks and one decode
    # A smaller budget means more, smaller steps.
    r2 = simulate(cfg(max_num_batched_tokens=1024), synthetic_workload([p], [2]), pm)
    assert r2.replica_stats[0].steps == 6


def test_prefix_cache_hit_shortens_the_second_ttft(pm):
    prefix, suffix = 1 + 1500, 40
    chain = ((("prefix", 0), prefix),)
    wl = synthetic_workload([prefix + suffix] * 2, [3, 3], arrivals=[0.0, 5.0], chains=[chain, chain])
    r = simulate(cfg(), wl, pm)
    hit = (prefix // 16) * 16
    assert r.hit_tokens == [0, hit]
    assert r.first_token[0] == pytest.approx(step(pm, (prefix + suffix, 0, True)), rel=1e-9)
    assert r.first_token[1] - r.sent[1] == pytest.approx(step(pm, (prefix + suffix - hit, hit, True)), rel=1e-9)
    assert r.first_token[1] - r.sent[1] < 0.5 * r.first_token[0]
    # Without prefix caching both pay the whole prompt.
    r2 = simulate(cfg(enable_prefix_caching=False), wl, pm)
    assert r2.hit_tokens == [0, 0]
    assert r2.first_token[1] - r2.sent[1] == pytest.approx(r2.first_token[0], rel=1e-9)


def test_disaggregated_adds_exactly_the_kv_transfer_time(pm):
    p, o = 700, 5
    wl = synthetic_workload([p], [o])
    colo = simulate(cfg(), wl, pm)
    bw, lat_ms = 10.0, 2.0
    dis = simulate(cfg(replicas=2, policy="disaggregated", prefill_replicas=1, link_bandwidth=bw,
                       link_latency=lat_ms), wl, pm)
    transfer = lat_ms / 1000 + p * pm.kv_bytes_per_token / (bw * 1e9)
    assert dis.first_token[0] == pytest.approx(colo.first_token[0], rel=1e-12)
    assert dis.finish[0] - colo.finish[0] == pytest.approx(transfer, rel=1e-9)
    assert dis.transfer_s[0] == pytest.approx(transfer, rel=1e-9)
    assert dis.replica_stats[0].decode_tokens == 0 and dis.replica_stats[1].prefill_tokens == 0


def test_disaggregated_transfers_share_the_prefill_link(pm):
    n, p, o = 10, 500, 4
    bw = 1.0  # GB/s: each transfer takes ~65 ms, longer than a prefill step
    r = simulate(cfg(replicas=2, policy="disaggregated", prefill_replicas=1, link_bandwidth=bw),
                 synthetic_workload([p] * n, [o] * n), pm)
    one = p * pm.kv_bytes_per_token / (bw * 1e9)
    landed = sorted(f + t for f, t in zip(r.first_token, r.transfer_s))
    assert all(b - a >= one * (1 - 1e-9) for a, b in zip(landed, landed[1:]))  # one at a time, FIFO
    assert landed[-1] >= n * one
    assert all(e - (f + t) >= (o - 1) * step(pm, (1, p, True)) for e, f, t in zip(r.finish, r.first_token,
                                                                                 r.transfer_s))
    assert r.replica_stats[0].decode_tokens == 0 and r.replica_stats[1].prefill_tokens == 0


# ---------------------------------------------------------------- fleet behaviour

def test_round_robin_spreads_evenly_and_least_loaded_balances(pm):
    wl = synthetic_workload([100] * 12, [4] * 12)
    r = simulate(cfg(replicas=4, router="round-robin"), wl, pm)
    assert [s.requests for s in r.replica_stats] == [3, 3, 3, 3]
    r = simulate(cfg(replicas=3, router="least-loaded"), wl, pm)
    assert [s.requests for s in r.replica_stats] == [4, 4, 4]


def test_replicas_are_independent_engines(pm):
    """Round-robin over 3 replicas = each replica simulated alone on its share of the requests."""
    spec = WorkloadSpec(num_requests=150, request_rate=60.0, random_input_len=600, random_output_len=40,
                        random_range_ratio=0.9, seed=7)
    wl = build_workload(spec)
    fleet = simulate(cfg(replicas=3, router="round-robin", max_num_batched_tokens=512), wl, pm)
    for k in range(3):
        idx = list(range(k, len(wl), 3))
        alone = simulate(cfg(max_num_batched_tokens=512),
                         synthetic_workload([wl.prompt_len[i] for i in idx], [wl.output_len[i] for i in idx],
                                            [wl.arrivals[i] for i in idx]), pm)
        assert alone.finish == pytest.approx([fleet.finish[i] for i in idx], rel=1e-12)
        assert alone.first_token == pytest.approx([fleet.first_token[i] for i in idx], rel=1e-12)


def test_prefix_aware_routing_keeps_a_prefix_on_one_replica(pm):
    spec = WorkloadSpec(dataset="prefix-repetition", num_requests=200, request_rate=50.0,
                        prefix_repetition_num_prefixes=4, prefix_repetition_prefix_len=512)
    wl = build_workload(spec)
    aware = summarize(simulate(cfg(replicas=4, router="prefix-aware"), wl, pm))[1]
    rr = summarize(simulate(cfg(replicas=4, router="round-robin"), wl, pm))[1]
    assert aware["prefix_cache_hit_rate"] > rr["prefix_cache_hit_rate"] > 0


def test_closed_loop_never_exceeds_max_concurrency(pm):
    spec = WorkloadSpec(num_requests=60, random_input_len=200, random_output_len=20, random_range_ratio=0.5,
                        max_concurrency=5)
    r = simulate(cfg(replicas=2), build_workload(spec), pm)
    assert r.max_in_flight == 5
    assert max_concurrency_observed(records(r)) <= 5
    assert all(f is not None for f in r.finish)


def test_client_latency_delays_sends_and_outputs_and_misses_the_step_boundary(pm):
    lat = 0.003
    p, o = 300, 6
    alone = simulate(cfg(), synthetic_workload([p], [o]), pm)
    r = simulate(cfg(client_latency=1000 * lat), synthetic_workload([p], [o]), pm)
    # One request: it reaches the engine lat after it is sent, its tokens reach the client lat later.
    assert r.first_token[0] - r.sent[0] == pytest.approx(alone.first_token[0] + 2 * lat, rel=1e-9)
    assert r.finish[0] - r.first_token[0] == pytest.approx(alone.finish[0] - alone.first_token[0], rel=1e-9)
    # Closed loop, two clients: A decodes long, B is short, C waits for B's client. Without
    # latency C joins the step right after B finishes; with it, C reaches the engine while A's
    # next decode step runs and waits for it.
    wl = synthetic_workload([p, p, p], [40, 2, 2], max_concurrency=2)
    r0 = simulate(cfg(), wl, pm)
    r1 = simulate(cfg(client_latency=1000 * lat), wl, pm)
    assert r1.sent[2] == pytest.approx(r1.finish[1], rel=1e-12)  # sent when its client saw B finish
    decode_a = step(pm, (1, p + 1, True))
    assert decode_a > 2 * lat
    extra = (r1.first_token[2] - r1.sent[2]) - (r0.first_token[2] - r0.sent[2])
    assert extra == pytest.approx(decode_a, rel=0.05)


def test_tiny_kv_pool_preempts_and_everything_finishes(pm):
    wl = synthetic_workload([300] * 8, [200] * 8)
    r = simulate(cfg(kv_cache_memory=60 * pm.kv_bytes_per_block), wl, pm)
    assert sum(r.preemptions) > 0
    assert all(f is not None and f > s for f, s in zip(r.finish, r.first_token))
    assert r.output_len == [200] * 8


def test_seeded_runs_are_deterministic(pm):
    spec = WorkloadSpec(num_requests=300, request_rate=40.0, random_input_len=256, random_output_len=32,
                        random_range_ratio=0.5, seed=3)
    a = simulate(cfg(replicas=3), build_workload(spec), pm)
    b = simulate(cfg(replicas=3), build_workload(spec), pm)
    assert a.finish == b.finish and a.first_token == b.first_token
    spec.seed = 4
    c = simulate(cfg(replicas=3), build_workload(spec), pm)
    assert c.finish != a.finish


# ---------------------------------------------------------------- the engine's scheduler as the oracle

def engine_trace(pm, prompts: list[list[int]], outputs: list[int], arrivals: list[float], num_blocks: int,
                 max_num_seqs: int, max_tokens: int, prefix_caching: bool = True,
                 hydragen: HydragenConfig | None = HydragenConfig(MIN_SAVED_TOKENS_TORCH)):
    """Run the engine's Scheduler through its public API, as LLMEngine.step does, with a stand-in
    model runner that samples a fresh token per sampling row, timing each step with PerfModel
    (Hydragen's parts from the step's shared_prefixes): (first-token times, finish times,
    preemptions, prefix-cache hit tokens, (steps with Hydragen parts, blocks they saved, most
    parts in a step))."""
    bm = BlockManager(num_blocks, 16, prefix_caching)
    sch = Scheduler(SchedulerConfig(max_num_seqs, max_tokens), bm, pm.model.max_position_embeddings, [],
                    hydragen=hydragen)
    fresh = itertools.count(10 ** 7)
    n = len(prompts)
    first, done = [None] * n, [None] * n
    rid_of: dict[int, int] = {}
    t, i = 0.0, 0
    hy_steps = hy_saved = hy_parts = 0
    while sum(d is not None for d in done) < n:
        while i < n and arrivals[i] <= t:
            req = Request.create(str(i), prompts[i], SamplingParams(max_tokens=outputs[i]), base_seed=0)
            rid_of[req.seqs[0].seq_id] = i
            sch.add_request(req)
            i += 1
        out = sch.schedule()
        if not out.seqs:
            t = arrivals[i]
            continue
        shared = [(tuple(p.rows), len(p.blocks) * 16) for p in out.shared_prefixes]
        if shared:
            hy_steps += 1
            hy_saved += sum((len(rows) - 1) * length for rows, length in shared) // 16
            hy_parts = max(hy_parts, len(shared))
        t += pm.step_time(StepShape([SeqWork(s.num_new_tokens, s.start, s.sample) for s in out.seqs], shared))
        sampled = {s.seq.seq_id: [next(fresh)] for s in out.seqs if s.sample}
        sampled.update({c.seq_id: [next(fresh)] for s in out.seqs for c in s.fork_candidates})
        for upd in sch.update_from_output(out, ModelRunnerOutput(sampled=sampled)):
            r = rid_of[upd.seq.seq_id]
            if upd.new_token_ids and first[r] is None:
                first[r] = t
            if upd.seq.finished:
                done[r] = t
    return first, done, sch.num_preemptions, bm.num_cache_hits, (hy_steps, hy_saved, hy_parts)


def _compare(pm, prompts, outputs, arrivals, chains, num_blocks, max_num_seqs, max_tokens,
             hydragen: HydragenConfig | None = HydragenConfig(MIN_SAVED_TOKENS_TORCH)):
    """The simulator against engine_trace: identical times, preemptions and hits. Returns the
    simulation and the engine's Hydragen (steps with parts, blocks saved, most parts in a step)."""
    ref_first, ref_done, ref_pre, ref_hits, ref_hy = engine_trace(pm, prompts, outputs, arrivals, num_blocks,
                                                                  max_num_seqs, max_tokens, hydragen=hydragen)
    wl = synthetic_workload([len(p) for p in prompts], outputs, arrivals, chains)
    hy = dict(enable_hydragen=False) if hydragen is None else dict(
        hydragen_min_saved_tokens=hydragen.min_saved_tokens, hydragen_min_saved_fraction=hydragen.min_saved_fraction)
    r = simulate(cfg(kv_cache_memory=num_blocks * pm.kv_bytes_per_block, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_tokens, **hy), wl, pm)
    assert r.kv_blocks == num_blocks
    assert r.first_token == pytest.approx(ref_first, rel=1e-9)
    assert r.finish == pytest.approx(ref_done, rel=1e-9)
    assert sum(r.preemptions) == ref_pre
    assert sum(r.hit_tokens) == ref_hits
    return r, ref_hy


def _random_prompts(n: int, seed: int, lo: int, hi: int, prefixes: list[list[int]] | None = None):
    import random

    rng = random.Random(seed)
    ids = itertools.count(1000)
    prompts, chains = [], []
    for j in range(n):
        head = [1]
        chain = ()
        if prefixes:
            k = rng.randrange(len(prefixes))
            head = [1] + prefixes[k]
            chain = ((("prefix", k), len(head)),)
        prompts.append(head + [next(ids) for _ in range(rng.randint(lo, hi))])
        chains.append(chain)
    outputs = [rng.randint(1, 60) for _ in range(n)]
    t, arrivals = 0.0, []
    for _ in range(n):
        arrivals.append(t)
        t += rng.expovariate(40.0)
    return prompts, outputs, arrivals, chains


def test_matches_engine_scheduler_chunked_and_admission_limits(pm):
    prompts, outputs, arrivals, chains = _random_prompts(60, 0, 10, 700)
    r, hy = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=5000, max_num_seqs=8, max_tokens=256)
    assert sum(r.preemptions) == 0


def test_matches_engine_scheduler_under_preemption(pm):
    prompts, outputs, arrivals, chains = _random_prompts(60, 1, 10, 300)
    r, hy = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=60, max_num_seqs=16, max_tokens=512)
    assert sum(r.preemptions) > 5


def test_matches_engine_scheduler_with_shared_prefixes(pm):
    prefixes = [list(range(100 + 1000 * k, 100 + 1000 * k + 200 + 37 * k)) for k in range(3)]
    prompts, outputs, arrivals, chains = _random_prompts(60, 2, 1, 100, prefixes)
    r, hy = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=3000, max_num_seqs=16, max_tokens=512)
    assert sum(r.hit_tokens) > 0
    assert hy[0] > 20  # Hydragen steps, the saving checked exactly
    # With the fraction rule relaxed and a lower per-part threshold, more (and smaller) parts engage.
    r, hy2 = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=3000, max_num_seqs=16, max_tokens=512,
                      hydragen=HydragenConfig(200, 0.2))
    assert hy2[0] > hy[0] and hy2[2] >= 3
    _compare(pm, prompts, outputs, arrivals, chains, num_blocks=3000, max_num_seqs=16, max_tokens=512,
             hydragen=None)


def test_matches_engine_scheduler_with_prefixes_evictions_and_preemption(pm):
    prefixes = [list(range(100 + 1000 * k, 100 + 1000 * k + 200 + 37 * k)) for k in range(3)]
    prompts, outputs, arrivals, chains = _random_prompts(80, 3, 1, 100, prefixes)
    r, hy = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=80, max_num_seqs=16, max_tokens=512)
    assert sum(r.preemptions) > 5 and sum(r.hit_tokens) > 0
    assert hy[0] > 10
    r, hy = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=80, max_num_seqs=16, max_tokens=512,
                     hydragen=HydragenConfig(100, 0.1))
    assert hy[0] > 10


def test_matches_engine_scheduler_on_multi_turn_prefix_chains(pm):
    """Turn t's prompt extends turn t-1's: nested prefixes (system prompt, then each earlier turn)."""
    import random

    rng, ids = random.Random(5), itertools.count(1000)
    system = [next(ids) for _ in range(60)]
    prompts, chains, outputs = [], [], []
    for c in range(16):
        hist, chain = [1] + system, ((("system",), 61),)
        for t in range(4):
            hist = hist + [next(ids) for _ in range(30)]
            chain = chain + ((("conv", c, t), len(hist)),)
            prompts.append(list(hist))
            chains.append(chain)
            outputs.append(rng.randint(1, 40))
            hist = hist + [next(ids) for _ in range(20)]
    arrivals = [i / 2000 for i in range(len(prompts))]
    r, hy = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=45, max_num_seqs=16, max_tokens=256)
    assert sum(r.preemptions) > 5 and sum(r.hit_tokens) > 0


def _multi_turn(conversations: int, turns: int, system: int, user: int, reply: int, seed: int):
    import random

    rng, ids = random.Random(seed), itertools.count(1000)
    sys_ids = [next(ids) for _ in range(system)]
    prompts, chains, outputs = [], [], []
    for c in range(conversations):
        hist, chain = [1] + sys_ids, ((("system",), 1 + system),)
        for t in range(turns):
            hist = hist + [next(ids) for _ in range(user)]
            chain = chain + ((("conv", c, t), len(hist)),)
            prompts.append(list(hist))
            chains.append(chain)
            outputs.append(rng.randint(1, 40))
            hist = hist + [next(ids) for _ in range(reply)]
    return prompts, chains, outputs


def test_matches_engine_hydragen_on_nested_multi_turn_prefixes(pm):
    """Nested parts: every row shares the system prompt, the turns of one conversation share its
    earlier turns too (a trie of prefix-cache nodes, runs breaking where rows stop or diverge)."""
    prompts, chains, outputs = _multi_turn(6, 3, 200, 100, 50, seed=11)
    arrivals = [i / 2000 for i in range(len(prompts))]
    r, hy = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=2000, max_num_seqs=32, max_tokens=512,
                     hydragen=HydragenConfig(128, 0.5))
    assert hy[0] > 10 and hy[2] >= 8  # the system part and nested per-conversation parts
    # The engine's defaults: the system prompt alone saves too little of the rows' blocks.
    r, hy = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=2000, max_num_seqs=32, max_tokens=512)
    assert hy[0] == 0
    # A tight pool: preemptions, evictions and recomputed sequences hitting their own blocks.
    prompts, chains, outputs = _multi_turn(8, 3, 200, 100, 50, seed=11)
    arrivals = [i / 2000 for i in range(len(prompts))]
    r, hy = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=100, max_num_seqs=32, max_tokens=512,
                     hydragen=HydragenConfig(64, 0.25))
    assert sum(r.preemptions) >= 5 and hy[0] > 50 and hy[2] >= 6


def test_matches_engine_scheduler_when_prompts_end_on_block_boundaries(pm):
    """A 256-token prompt's last block is not claimed while it is computed (the engine hashes a
    prompt's blocks up to its last token's), so the next turn, admitted meanwhile, computes its own
    copy: a private, unregistered block, after which its later blocks are registered again."""
    prompts, chains, outputs = _multi_turn(5, 4, 30, 100, 25, seed=100)
    assert len(prompts[1]) == 256
    hys = []
    for hydragen in (HydragenConfig(16, 0.1), HydragenConfig(MIN_SAVED_TOKENS_TORCH), None):
        r, hy = _compare(pm, prompts, outputs, [0.0] * len(prompts), chains, num_blocks=94, max_num_seqs=32,
                         max_tokens=128, hydragen=hydragen)
        assert sum(r.preemptions) >= 5 and sum(r.hit_tokens) > 0
        hys.append(hy[0])
    assert hys[0] > 20 and hys[2] == 0


def test_hydragen_index_matches_find_shared_prefixes_on_random_tries():
    """The simulator's incremental index against the engine's function on the block tables the
    rows would have: random prefix trees, rows holding a path of nodes up to a random block
    (partial holdings too), rows joining and leaving in random order."""
    import random

    from ridgeline.sim.cache import Node
    from ridgeline.sim.hydragen import HydragenIndex

    rng = random.Random(0)
    ids = itertools.count()
    nested = 0  # most parts in one step
    for trial in range(60):
        bs, need = 16, rng.choice([16, 64, 128, 512])
        roots = []  # (node, children)

        def grow(start, depth):
            nd = Node(("n", next(ids)), start, start + rng.randint(1, 6))
            kids = [grow(nd.end, depth + 1) for _ in range(rng.choice([0, 1, 1, 2, 3]) if depth < 4 else 0)]
            return nd, kids

        roots = [grow(0, 0) for _ in range(rng.randint(1, 3))]
        index = HydragenIndex(bs, need)
        live: list[tuple] = []  # (sig, table, full blocks)
        for _ in range(40):
            if live and rng.random() < 0.35:
                sig, _, _ = live.pop(rng.randrange(len(live)))
                index.remove(sig)
            else:
                path, (nd, kids) = [], rng.choice(roots)
                while True:
                    path.append(nd)
                    if not kids or rng.random() < 0.3:
                        break
                    nd, kids = rng.choice(kids)
                held = rng.randint(path[-1].start + 1, path[-1].end)
                sig = tuple((n, min(held, n.end)) for n in path)
                table = [next(n for n in path if n.start <= j < n.end).key[1] * 1000 + j for j in range(held)]
                table += [10 ** 9 + next(ids) for _ in range(rng.randint(0, 3))]  # private blocks
                live.append((sig, table, len(table)))
                index.add(sig)
            parts, _ = find_shared_prefixes([t for _, t, _ in live], [f for _, _, f in live], bs,
                                            HydragenConfig(need, 0.0))
            expect = sum((len(p.rows) - 1) * len(p.blocks) for p in parts)
            assert index.saved_blocks() == expect, (trial, live)
            assert index.parts() == len(parts), (trial, live)
            nested = max(nested, len(parts))
    assert nested >= 4  # nested levels counted as parts of their own


def _decode_steps(pm, starts: list[int], saved: int = 0, parts: int = 0) -> float:
    """One decode step by hand: rows at these contexts, `saved` KV positions not re-read (of which
    the device saves its shared_prefix_efficiency), `parts` shared-prefix parts' dispatch cost."""
    kv = sum(c + 1 for c in starts)
    n = len(starts)
    return (pm.step_time_vector((n, n, n, float(kv), float(kv - saved * pm.hw.shared_prefix_efficiency)))
            + parts * pm.shared_part_overhead_s)


def _hydragen_workload(prefix: int, rows: list[tuple[int, int, bool]], max_tokens: int = 8192):
    """Request 0 computes a cached prefix of `prefix` tokens alone; at t=1 s rows (prompt, output,
    shares the prefix) arrive together. Engine prompts and simulator chains."""
    ids = itertools.count(10 ** 5)
    head = [1] + [next(ids) for _ in range(prefix - 1)]
    chain = ((("p", 0), prefix),)
    prompts, outputs, chains, arrivals = [head], [1], [chain], [0.0]
    for plen, out, shares in rows:
        base = head if shares else [1]
        prompts.append(base + [next(ids) for _ in range(plen - len(base))])
        outputs.append(out)
        chains.append(chain if shares else ())
        arrivals.append(1.0)
    return prompts, outputs, arrivals, chains


def test_hydragen_engages_for_many_rows_sharing_a_long_prefix(pm):
    """8 decodes share 1,024 cached tokens (64 blocks): 7 x 64 blocks saved out of 8 x 66 full
    ones, well past both thresholds, so every decode step reads 7 x 1024 fewer KV positions
    (and computes as many attention pairs)."""
    prompts, outputs, arrivals, chains = _hydragen_workload(1025, [(1056, 10, True)] * 8)
    r, hy = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=2000, max_num_seqs=16, max_tokens=2048)
    assert r.hit_tokens[1:] == [1024] * 8 and hy[0] == 9
    on = sum(_decode_steps(pm, [1056 + j] * 8, saved=7 * 1024, parts=1) for j in range(9))
    off = sum(_decode_steps(pm, [1056 + j] * 8) for j in range(9))
    assert on - 9 * pm.shared_part_overhead_s < off  # fewer reads, plus the part's dispatch cost per step
    for i in range(1, 9):
        assert r.finish[i] - r.first_token[i] == pytest.approx(on, rel=1e-9)
    wl = synthetic_workload([len(p) for p in prompts], outputs, arrivals, chains)
    base = dict(kv_cache_memory=2000 * pm.kv_bytes_per_block, max_num_seqs=16)
    plain = simulate(cfg(enable_hydragen=False, **base), wl, pm)
    assert plain.first_token == r.first_token  # prefill steps never use it
    for i in range(1, 9):
        assert plain.finish[i] - plain.first_token[i] == pytest.approx(off, rel=1e-9)
    # (g - 1) * P below min_saved_tokens: no part, the decode steps read everything.
    high = simulate(cfg(hydragen_min_saved_tokens=7 * 1024 + 1, **base), wl, pm)
    assert high.finish == plain.finish


def test_hydragen_fraction_rule_keeps_it_off_then_on(pm):
    """3 decodes share 512 cached tokens (2 x 32 blocks saved, (g-1)*P = 1024 >= 512) beside 5
    unshared 1000-token decodes (62 full blocks each): 64 < 0.5 x (3 x 32 + 5 x 62), so no
    Hydragen while those run; once they finish, 64 >= 0.5 x 3 x 32 and it engages."""
    rows = [(514, 30, True)] * 3 + [(1000, 5, False)] * 5
    prompts, outputs, arrivals, chains = _hydragen_workload(513, rows)
    r, hy = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=2000, max_num_seqs=16, max_tokens=8192)
    assert hy[0] == 25  # decode steps 4..28, three rows each
    wide = [_decode_steps(pm, [514 + j] * 3 + [1000 + j] * 5) for j in range(4)]  # nothing saved
    narrow = [_decode_steps(pm, [514 + j] * 3, saved=2 * 512, parts=1) for j in range(4, 29)]
    for i in (1, 2, 3):
        assert r.finish[i] - r.first_token[i] == pytest.approx(sum(wide) + sum(narrow), rel=1e-9)
    for i in range(4, 9):
        assert r.finish[i] - r.first_token[i] == pytest.approx(sum(wide), rel=1e-9)
    wl = synthetic_workload([len(p) for p in prompts], outputs, arrivals, chains)
    plain = simulate(cfg(enable_hydragen=False, kv_cache_memory=2000 * pm.kv_bytes_per_block,
                         max_num_batched_tokens=8192), wl, pm)
    assert plain.finish[4:] == r.finish[4:]  # identical while the fraction rule keeps it off
    narrow_off = [_decode_steps(pm, [514 + j] * 3) for j in range(4, 29)]
    assert r.finish[1] - plain.finish[1] == pytest.approx(sum(narrow) - sum(narrow_off), rel=1e-9)
    assert sum(narrow) - 25 * pm.shared_part_overhead_s < sum(narrow_off)


def test_hydragen_fraction_rule_within_a_decode_run(pm):
    """2 decodes sharing 32 blocks: saved 32 >= 0.5 x (2 x 32) while each has 32 full blocks
    (contexts 514..527); from context 528 on, 33 full blocks each and 32 < 33: off. Nothing else
    happens, so this is one run of decode-only steps switching off midway."""
    prompts, outputs, arrivals, chains = _hydragen_workload(513, [(514, 20, True)] * 2)
    r, hy = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=2000, max_num_seqs=16, max_tokens=2048)
    assert hy[0] == 14
    expect = sum(_decode_steps(pm, [514 + j] * 2, saved=512 if j < 14 else 0, parts=1 if j < 14 else 0)
                 for j in range(19))
    assert r.finish[1] - r.first_token[1] == pytest.approx(expect, rel=1e-9)
    assert r.replica_stats[0].steps == 1 + 1 + 19  # request 0, the two prompts, the decodes


# ---------------------------------------------------------------- options and CLI

@pytest.mark.parametrize("kw, option", [
    (dict(replicas=0), "--replicas"),
    (dict(replicas=4, policy="disaggregated", prefill_replicas=4), "--prefill-replicas"),
    (dict(replicas=4, policy="disaggregated", prefill_replicas=0), "--prefill-replicas"),
    (dict(replicas=1, policy="disaggregated"), "--replicas"),
    (dict(replicas=2, prefill_replicas=1), "--prefill-replicas"),
    (dict(policy="pipelined"), "--policy"),
    (dict(router="random"), "--router"),
    (dict(replicas=2, policy="disaggregated", link_bandwidth=0.0), "--link-bandwidth"),
    (dict(replicas=2, policy="disaggregated", link_latency=-1.0), "--link-latency"),
    (dict(client_latency=float("nan")), "--client-latency"),
    (dict(max_num_seqs=512, max_num_batched_tokens=256), "--max-num-batched-tokens"),
    (dict(max_num_seqs=0), "--max-num-seqs"),
    (dict(block_size=0), "--block-size"),
    (dict(kv_cache_memory="lots"), "--kv-cache-memory"),
    (dict(hydragen_min_saved_tokens=0), "--hydragen-min-saved-tokens"),
    (dict(hydragen_min_saved_fraction=1.5), "--hydragen-min-saved-fraction"),
])
def test_bad_config_names_the_option(kw, option):
    with pytest.raises(ValueError, match=option):
        cfg(**kw)


def test_config_composes_the_engine_configs():
    """The nested parts are the engine's own classes (their checks, their defaults, except the KV
    pool: what the device leaves); settings() gives the flat names back."""
    c = cfg(max_num_seqs=8, block_size=32, kv_cache_memory="1GiB", enable_hydragen=False, replicas=2)
    assert c.scheduler == SchedulerConfig(max_num_seqs=8)
    assert c.cache == CacheConfig(block_size=32, kv_cache_memory="1GiB")
    assert c.hydragen == HydragenConfig(enabled=False)
    assert SimConfig().cache.kv_cache_memory is None and SimConfig().hydragen == HydragenConfig()
    assert SimConfig.from_kwargs(**c.settings()) == c
    with pytest.raises(ValueError, match="max_num_seqs must be an integer >= 1"):
        SimConfig(scheduler=SchedulerConfig(max_num_seqs=0))


@pytest.mark.parametrize("kw, option", [
    (dict(request_rate=0.0), "--request-rate"),
    (dict(burstiness=-1.0), "--burstiness"),
    (dict(max_concurrency=0), "--max-concurrency"),
    (dict(num_requests=0), "--num-requests"),
    (dict(random_input_len=0), "--random-input-len"),
    (dict(random_range_ratio=1.0), "--random-range-ratio"),
    (dict(dataset="sharegpt"), "--dataset"),
])
def test_bad_workload_names_the_option(kw, option):
    with pytest.raises(ValueError, match=option):
        build_workload(WorkloadSpec(**kw))


def test_unknown_hardware_and_oversized_requests(pm):
    with pytest.raises(HardwareSpecError, match="unknown hardware 'tpu-v9'"):
        Simulator(cfg(hardware="tpu-v9"), synthetic_workload([10], [1]))
    with pytest.raises(ValueError, match="max_model_len"):
        Simulator(cfg(), synthetic_workload([9000], [1]), pm)
    with pytest.raises(ValueError, match="--kv-cache-memory"):
        Simulator(cfg(kv_cache_memory=4 * pm.kv_bytes_per_block), synthetic_workload([100], [10]), pm)


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_cli_json_table_and_plot(tmp_path, capsys):
    base = ["--model", MODEL, "--hardware", HW, "--num-requests", "200", "--request-rate", "100",
            "--random-input-len", "300", "--random-output-len", "40", "--slo", "ttft:200", "tpot:30"]
    out = tmp_path / "r.json"
    assert run_from_args(_parse(base + ["--replicas", "4", "--policy", "disaggregated", "--prefill-replicas", "1",
                                        "--json", "--result-file", str(out)])) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(out.read_text())
    m = doc["metrics"]
    assert m["completed"] == 200 and "itl_ms" not in m
    assert set(m["ttft_ms"]["percentiles"]) == {"p50", "p90", "p99"}
    assert 0 <= doc["slo_attainment"] <= 1 and m["goodput"] <= m["request_throughput"]
    assert [r["role"] for r in doc["replicas"]] == ["prefill", "decode", "decode", "decode"]
    assert all(0 < r["utilization"] <= 1 for r in doc["replicas"])
    assert doc["settings"]["request_rate"] == 100 and doc["kv_transfer_ms"]["mean"] > 0

    png = tmp_path / "cdf.png"
    assert run_from_args(_parse(base + ["--plot", str(png)])) == 0
    table = capsys.readouterr().out
    assert "Mean TTFT (ms):" in table and "SLO attainment (%):" in table and "ITL" not in table
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError, match="--request-rate"):
        run_from_args(_parse(base + ["--request-rate", "-1"]))


def test_cli_hydragen_options():
    from ridgeline.sim.cli import config_from_args

    c, _ = config_from_args(_parse([]))
    # the engine's defaults with PyTorch attention's break-even, which SimConfig() resolves to too
    assert c.hydragen == HydragenConfig(512, 0.5) == SimConfig().hydragen.resolve(fused_kernels=False)
    c, _ = config_from_args(_parse(["--disable-hydragen", "--hydragen-min-saved-tokens", "64",
                                    "--hydragen-min-saved-fraction", "0.25"]))
    assert c.hydragen == HydragenConfig(64, 0.25, enabled=False)


def test_workload_lengths_follow_the_bench_datasets():
    from ridgeline.bench.datasets import multi_turn_dataset, prefix_repetition_dataset

    mt = build_workload(WorkloadSpec(dataset="multi-turn", num_requests=12, multi_turn_num_turns=3,
                                     multi_turn_system_len=20, multi_turn_user_len=5, multi_turn_assistant_len=7))
    text = multi_turn_dataset(4, 3, 20, 5, 7, 64)
    assert mt.prompt_len == [r.input_len + 1 for r in text]  # + BOS
    assert mt.chains[5] == ((("system",), 21), (("conv", 1, 0), 26), (("conv", 1, 1), 38), (("conv", 1, 2), 50))
    assert mt.prompt_len[5] == 50 and mt.route_keys[5] == ("conv", 1)
    pr = build_workload(WorkloadSpec(dataset="prefix-repetition", num_requests=40, prefix_repetition_num_prefixes=4))
    assert sorted(k for k in pr.route_keys) == sorted(("prefix", r.meta["prefix"])
                                                      for r in prefix_repetition_dataset(40, 256, 32, 4, 64))
    assert set(pr.prompt_len) == {1 + 256 + 32} and all(c == ((k, 257),) for c, k in zip(pr.chains, pr.route_keys))
    rnd = build_workload(WorkloadSpec(num_requests=500, random_input_len=100, random_output_len=50,
                                      random_range_ratio=0.2, request_rate=10.0))
    assert 81 <= min(rnd.prompt_len) and max(rnd.prompt_len) <= 121 and 40 <= min(rnd.output_len)
    assert rnd.arrivals[0] == 0.0 and 30 < rnd.arrivals[-1] < 70  # Poisson at 10 req/s


def test_importing_the_simulator_does_not_import_torch():
    """The simulator plans for devices this machine lacks: it needs the engine's rules, not torch."""
    code = "import sys, ridgeline.sim, ridgeline.sim.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_inf_rate_sends_everything_at_once(pm):
    r = simulate(cfg(replicas=2), build_workload(WorkloadSpec(num_requests=50)), pm)
    assert r.sent == [0.0] * 50 and math.isfinite(r.makespan_s)
