"""The serving benchmark's metric code on a synthetic trace with known timings (no server needed)."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest

from ridgeline.bench.client import add_arguments, build_dataset, inter_arrival_times
from ridgeline.bench.datasets import multi_turn_dataset, prefix_repetition_dataset, random_dataset
from ridgeline.bench.metrics import (RequestRecord, compute_metrics, format_table, max_concurrency_observed,
                                     parse_slos)


def _trace() -> list[RequestRecord]:
    # Request A: sent at t=0, first chunk at 0.100 s, then 4 more chunks 0.020 s apart -> 5 tokens, E2E 0.180 s.
    a = RequestRecord(success=True, prompt_tokens=10, output_tokens=5, ttft=0.100, latency=0.180,
                      itl=[0.020, 0.020, 0.020, 0.020], start_time=0.0)
    # Request B: sent at t=0.050, TTFT 0.300, 3 tokens, gaps 0.050 and 0.150 -> E2E 0.500 s.
    b = RequestRecord(success=True, prompt_tokens=20, output_tokens=3, ttft=0.300, latency=0.500,
                      itl=[0.050, 0.150], start_time=0.050)
    # Request C: one token only (no TPOT), sent at t=1.0, TTFT = E2E = 0.200.
    c = RequestRecord(success=True, prompt_tokens=30, output_tokens=1, ttft=0.200, latency=0.200, itl=[],
                      start_time=1.0)
    # Request D failed: it must not count anywhere but `failed`.
    d = RequestRecord(success=False, prompt_tokens=99, output_tokens=0, ttft=9.0, latency=9.0, error="HTTP 500")
    return [a, b, c, d]


def test_metrics_on_a_known_trace():
    m = compute_metrics(_trace(), duration_s=2.0, percentiles=(50, 90, 99))
    assert m.completed == 3 and m.failed == 1
    assert m.total_input_tokens == 60 and m.total_output_tokens == 9
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(4.5)
    assert m.total_token_throughput == pytest.approx(34.5)

    # TTFT over A, B, C: 100, 300, 200 ms.
    assert m.ttft_ms.mean == pytest.approx(200.0)
    assert m.ttft_ms.median == pytest.approx(200.0)
    assert m.ttft_ms.std == pytest.approx(np.std([100, 300, 200]))
    assert m.ttft_ms.percentiles["p90"] == pytest.approx(280.0)  # linear interpolation, as numpy/vLLM
    assert m.ttft_ms.percentiles["p99"] == pytest.approx(298.0)

    # TPOT = (E2E - TTFT) / (tokens - 1): A = 80/4 = 20 ms, B = 200/2 = 100 ms; C has one token -> excluded.
    assert m.tpot_ms.mean == pytest.approx(60.0)
    assert m.tpot_ms.median == pytest.approx(60.0)
    assert m.tpot_ms.percentiles["p50"] == pytest.approx(60.0)

    # ITL pools every gap: 20, 20, 20, 20, 50, 150 ms.
    assert m.itl_ms.mean == pytest.approx(280 / 6)
    assert m.itl_ms.median == pytest.approx(20.0)
    assert m.itl_ms.percentiles["p99"] == pytest.approx(np.percentile([20, 20, 20, 20, 50, 150], 99))

    # E2E: 180, 500, 200 ms.
    assert m.e2el_ms.mean == pytest.approx(880 / 3)
    assert m.e2el_ms.median == pytest.approx(200.0)

    # A (0 - 0.18) and B (0.05 - 0.55) overlap; C starts at 1.0 alone.
    assert m.max_concurrent_requests == 2
    assert m.goodput is None

    table = format_table(m)
    assert "Successful requests:" in table and "Mean TPOT (ms):" in table and "60.00" in table


def test_goodput_counts_requests_meeting_every_slo():
    trace = _trace()
    # TTFT <= 250 ms keeps A and C; TPOT <= 50 ms keeps A and C (C has no TPOT, so it passes).
    m = compute_metrics(trace, 2.0, parse_slos(["ttft:250", "tpot:50"]))
    assert m.goodput == pytest.approx(2 / 2.0)
    assert m.slos_ms == {"ttft": 250.0, "tpot": 50.0}
    # An E2E SLO of 190 ms keeps only A.
    assert compute_metrics(trace, 2.0, parse_slos(["e2el:190"])).goodput == pytest.approx(0.5)
    # Generous SLOs: goodput equals request throughput.
    loose = compute_metrics(trace, 2.0, parse_slos(["ttft:10000", "tpot:10000", "e2el:10000"]))
    assert loose.goodput == pytest.approx(loose.request_throughput)


def test_tpot_definition_per_record():
    r = RequestRecord(success=True, output_tokens=11, ttft=0.5, latency=1.5)
    assert r.tpot == pytest.approx(0.1)
    assert RequestRecord(success=True, output_tokens=1, ttft=0.5, latency=0.5).tpot is None
    assert RequestRecord(success=False, output_tokens=5, ttft=0.5, latency=1.0).tpot is None


def test_empty_and_invalid_inputs():
    m = compute_metrics([RequestRecord(success=False, error="x")], 1.0)
    assert m.completed == 0 and m.failed == 1 and m.ttft_ms.mean == 0.0 and m.request_throughput == 0.0
    with pytest.raises(ValueError, match="duration"):
        compute_metrics([], 0.0)
    for bad in (["ttft"], ["foo:10"], ["ttft:abc"], ["tpot:-1"]):
        with pytest.raises(ValueError, match="slo"):
            parse_slos(bad)


def test_max_concurrency_observed_back_to_back_is_one():
    recs = [RequestRecord(success=True, start_time=float(i), latency=1.0) for i in range(5)]
    assert max_concurrency_observed(recs) == 1
    recs.append(RequestRecord(success=True, start_time=0.5, latency=3.0))
    assert max_concurrency_observed(recs) == 2


def test_gamma_arrivals_rate_and_burstiness():
    n = 20001
    poisson = np.array(inter_arrival_times(n, rate=10.0, burstiness=1.0, seed=1))
    assert len(poisson) == n - 1
    assert poisson.mean() == pytest.approx(0.1, rel=0.03)
    assert (poisson.std() / poisson.mean()) ** 2 == pytest.approx(1.0, rel=0.06)  # exponential: CV^2 = 1
    bursty = np.array(inter_arrival_times(n, rate=10.0, burstiness=0.25, seed=1))
    assert bursty.mean() == pytest.approx(0.1, rel=0.05)
    assert (bursty.std() / bursty.mean()) ** 2 == pytest.approx(4.0, rel=0.1)  # Gamma: CV^2 = 1 / shape
    assert inter_arrival_times(5, rate=math.inf, burstiness=1.0, seed=0) == [0.0] * 4
    assert inter_arrival_times(50, 3.0, 1.0, seed=7) == inter_arrival_times(50, 3.0, 1.0, seed=7)


def test_datasets():
    rnd = random_dataset(20, input_len=50, output_len=10, range_ratio=0.5, seed=3)
    assert len(rnd) == 20 and all(25 <= r.input_len <= 75 and 5 <= r.output_len <= 15 for r in rnd)
    assert all(len(r.prompt.split()) == r.input_len for r in rnd)
    assert random_dataset(5, 10, 2, seed=1)[0].prompt == random_dataset(5, 10, 2, seed=1)[0].prompt

    pre = prefix_repetition_dataset(12, prefix_len=30, suffix_len=5, num_prefixes=3, output_len=8, seed=0)
    assert len(pre) == 12
    heads = {" ".join(r.prompt.split()[:30]) for r in pre}
    assert len(heads) == 3  # three distinct shared prefixes
    assert len({r.prompt for r in pre}) == 12  # but every suffix differs
    assert all(len(r.prompt.split()) == 35 and r.output_len == 8 for r in pre)

    chat = multi_turn_dataset(3, turns=2, system_len=12, user_len=4, assistant_len=3, output_len=6, seed=0)
    assert len(chat) == 6 and all(r.is_chat for r in chat)
    systems = {r.messages[0]["content"] for r in chat}
    assert len(systems) == 1 and all(r.messages[0]["role"] == "system" for r in chat)
    second_turns = [r for r in chat if r.meta["turn"] == 1]
    assert all([m["role"] for m in r.messages] == ["system", "user", "assistant", "user"] for r in second_turns)

    with pytest.raises(ValueError, match="num_prompts"):
        random_dataset(0, 10, 10)


def test_cli_dataset_options():
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--dataset", "multi-turn", "--num-prompts", "5", "--multi-turn-num-turns", "2"])
    reqs = build_dataset(args)
    assert len(reqs) == 5 and all(r.is_chat for r in reqs)
    args = p.parse_args(["--dataset", "prefix-repetition", "--num-prompts", "4", "--prefix-repetition-prefix-len", "8"])
    assert len(build_dataset(args)) == 4
