"""The serving simulator against independent computations: step times from PerfModel, and the
engine's own Scheduler and BlockManager driven step by step on the same workload."""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import pytest

from ridgeline.bench.metrics import max_concurrency_observed
from ridgeline.kv_cache import BlockManager
from ridgeline.perf import HardwareSpecError, SeqWork, StepShape
from ridgeline.sampling_params import SamplingParams
from ridgeline.scheduler import Scheduler, SchedulerConfig
from ridgeline.sequence import Request, Sequence
from ridgeline.sim import (SimConfig, Simulator, StepTimer, WorkloadSpec, build_perf_model, build_workload, records,
                           simulate, summarize, synthetic_workload)
from ridgeline.sim.cli import add_arguments, run_from_args

MODEL = str(Path(__file__).resolve().parent.parent / "examples" / "llama3-8b-config.json")
HW = "h100-sxm"


def cfg(**kw) -> SimConfig:
    base = dict(model=MODEL, hardware=HW)
    base.update(kw)
    return SimConfig(**base)


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
                 max_num_seqs: int, max_tokens: int, prefix_caching: bool = True):
    """Drive ridgeline.scheduler.Scheduler with a BlockManager as LLMEngine.step does, timing each
    batch with PerfModel: (first-token times, finish times, preemptions, prefix-cache hit tokens)."""
    bm = BlockManager(num_blocks, 16, prefix_caching)
    sch = Scheduler(SchedulerConfig(max_num_seqs, max_tokens), bm)
    fresh = itertools.count(10 ** 7)
    n = len(prompts)
    first, done = [None] * n, [None] * n
    rid_of: dict[int, int] = {}
    t, i = 0.0, 0
    while sum(d is not None for d in done) < n:
        while i < n and arrivals[i] <= t:
            req = Request(str(i), None, list(prompts[i]), SamplingParams(max_tokens=outputs[i]))
            seq = Sequence(req, 0, list(prompts[i]), len(prompts[i]), None, None)
            req.seqs.append(seq)
            rid_of[seq.seq_id] = i
            sch.add(seq)
            i += 1
        batch = sch.schedule()
        if not batch.seqs:
            t = arrivals[i]
            continue
        starts = [s.num_computed_tokens for s in batch.seqs]
        t += pm.step_time(StepShape([SeqWork(k, c, c + k == s.num_tokens)
                                     for s, k, c in zip(batch.seqs, batch.num_new_tokens, starts)]))
        for s, k, c in zip(batch.seqs, batch.num_new_tokens, starts):
            s.num_computed_tokens += k
            s.num_cached_blocks = bm.cache_full_blocks(s.token_ids, s.block_hashes, s.block_table,
                                                       s.num_computed_tokens, s.num_cached_blocks)
            if c + k == s.num_tokens:
                s.token_ids.append(next(fresh))
                r = rid_of[s.seq_id]
                if first[r] is None:
                    first[r] = t
                if s.num_output_tokens >= outputs[r]:
                    sch.finish(s)
                    done[r] = t
    return first, done, sch.num_preemptions, bm.num_cache_hits


def _compare(pm, prompts, outputs, arrivals, chains, num_blocks, max_num_seqs, max_tokens):
    ref_first, ref_done, ref_pre, ref_hits = engine_trace(pm, prompts, outputs, arrivals, num_blocks, max_num_seqs,
                                                          max_tokens)
    wl = synthetic_workload([len(p) for p in prompts], outputs, arrivals, chains)
    r = simulate(cfg(kv_cache_memory=num_blocks * pm.kv_bytes_per_block, max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_tokens), wl, pm)
    assert r.kv_blocks == num_blocks
    assert r.first_token == pytest.approx(ref_first, rel=1e-9)
    assert r.finish == pytest.approx(ref_done, rel=1e-9)
    assert sum(r.preemptions) == ref_pre
    assert sum(r.hit_tokens) == ref_hits
    return r


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
    r = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=5000, max_num_seqs=8, max_tokens=256)
    assert sum(r.preemptions) == 0


def test_matches_engine_scheduler_under_preemption(pm):
    prompts, outputs, arrivals, chains = _random_prompts(60, 1, 10, 300)
    r = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=60, max_num_seqs=16, max_tokens=512)
    assert sum(r.preemptions) > 5


def test_matches_engine_scheduler_with_shared_prefixes(pm):
    prefixes = [list(range(100 + 1000 * k, 100 + 1000 * k + 200 + 37 * k)) for k in range(3)]
    prompts, outputs, arrivals, chains = _random_prompts(60, 2, 1, 100, prefixes)
    r = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=3000, max_num_seqs=16, max_tokens=512)
    assert sum(r.hit_tokens) > 0


def test_matches_engine_scheduler_with_prefixes_evictions_and_preemption(pm):
    prefixes = [list(range(100 + 1000 * k, 100 + 1000 * k + 200 + 37 * k)) for k in range(3)]
    prompts, outputs, arrivals, chains = _random_prompts(80, 3, 1, 100, prefixes)
    r = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=80, max_num_seqs=16, max_tokens=512)
    assert sum(r.preemptions) > 5 and sum(r.hit_tokens) > 0


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
    r = _compare(pm, prompts, outputs, arrivals, chains, num_blocks=45, max_num_seqs=16, max_tokens=256)
    assert sum(r.preemptions) > 5 and sum(r.hit_tokens) > 0


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
    (dict(max_num_seqs=512, max_num_batched_tokens=256), "--max-num-batched-tokens"),
    (dict(kv_cache_memory="lots"), "--kv-cache-memory"),
])
def test_bad_config_names_the_option(kw, option):
    with pytest.raises(ValueError, match=option):
        cfg(**kw).validate()


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


def test_inf_rate_sends_everything_at_once(pm):
    r = simulate(cfg(replicas=2), build_workload(WorkloadSpec(num_requests=50)), pm)
    assert r.sent == [0.0] * 50 and math.isfinite(r.makespan_s)
