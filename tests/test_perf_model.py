"""The performance model: operator FLOP and byte counts against hand-computed values, memory fit
against the real engine's pool, hardware specs and their errors, calibration and the planner
through the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from ridgeline.cli import main
from ridgeline.config import ModelConfig
from ridgeline.engine import EngineConfig, LLMEngine
from ridgeline.kv_cache import KVCachePool
from ridgeline.loader import load_model_config
from ridgeline.perf import HardwareSpec, HardwareSpecError, PerfModel, SeqWork, StepShape, load_spec
from ridgeline.perf.ops import operator_table, weight_bytes
from ridgeline.sampling_params import SamplingParams

# A toy Llama: hidden 8, 2 heads of 4 (1 KV head), MLP 16, 2 layers, vocab 100.
TOY = ModelConfig(architecture="llama", vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2,
                  num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-5, rope_theta=1e4,
                  max_position_embeddings=256, tie_word_embeddings=True)
# One made-up device with round numbers: 1 TFLOP/s float32, 100 GB/s, perfect efficiency, no overheads.
ROUND = HardwareSpec(name="round", peak_flops={"float32": 1e12}, memory_bandwidth=1e11, memory_capacity=1e9,
                     compute_efficiency=1.0, memory_efficiency=1.0, attention_compute_efficiency=1.0,
                     attention_memory_efficiency=1.0, op_overhead_s=0.0, step_overhead_s=0.0, seq_overhead_s=0.0)


def _ops(step: StepShape, cfg: ModelConfig = TOY, **dtypes) -> dict[str, tuple[float, float]]:
    v = step.stats(cfg.sliding_window).vector()
    return {op.name: (op.flops_for(v), op.bytes_for(v)) for op in operator_table(cfg, **dtypes)}


def test_step_aggregates_by_hand():
    # decode at context 5; a 3-token chunk after 2 cached tokens (not its last chunk); a 4-token prompt.
    step = StepShape([SeqWork(1, 5), SeqWork(3, 2, sampled=False), SeqWork(4, 0)])
    s = step.stats()
    assert (s.tokens, s.seqs, s.logits) == (8, 3, 2)
    # keys seen per query: 6 | 3 + 4 + 5 | 1 + 2 + 3 + 4
    assert s.attn_pairs == 6 + 12 + 10
    assert s.kv_read == 6 + 5 + 4
    # a sliding window of 3 caps each query's keys at 3 and the keys read at window + new - 1
    w = step.stats(sliding_window=3)
    assert w.attn_pairs == 3 + 9 + (1 + 2 + 3 + 3)
    assert w.kv_read == 3 + 5 + 4
    # two decodes sharing a 4-token prefix read it once
    shared = StepShape([SeqWork(1, 9), SeqWork(1, 9)], shared_prefixes=[((0, 1), 4)]).stats()
    assert shared.kv_read == 2 * 10 - 4 and shared.attn_pairs == 20


def test_operator_counts_by_hand_float32():
    ops = _ops(StepShape.decode(2, 5), dtype="float32")  # T = 2 tokens, 2 logits, 12 pairs, kv_read 12
    # qkv: [2, 8] @ [8, 16] per layer, 2 layers: FLOPs 2*2*8*16 = 512 each; bytes 4*(8*16) + 4*2*(8+16)
    assert ops["qkv_proj"] == (2 * 512, 2 * (512 + 192))
    # o: [2, 8] @ [8, 8]
    assert ops["o_proj"] == (2 * 256, 2 * (256 + 128))
    # gate_up: [2, 8] @ [8, 32]; down: [2, 16] @ [16, 8]
    assert ops["gate_up_proj"] == (2 * 1024, 2 * (1024 + 320))
    assert ops["down_proj"] == (2 * 512, 2 * (512 + 192))
    # attention: 12 query-key pairs x 2 heads x (4*4 + 5); K and V of 12 positions, 1 KV head of 4;
    # queries in and outputs out: 2 tokens x 8 x 4 bytes x 2
    assert ops["attention"] == (2 * 12 * 2 * 21, 2 * (12 * 2 * 4 * 4 + 2 * 2 * 8 * 4))
    assert ops["kv_write"] == (0, 2 * (2 * 2 * 4 * 8))
    # lm_head on 2 rows: 2*2*8*100 FLOPs; the 100 x 8 weight, 2 rows in, 2 float32 logit rows out
    assert ops["lm_head"] == (3200, 3200 + 64 + 800)
    assert ops["attn_norm"] == (2 * 4 * 2 * 8, 2 * 2 * 4 * 2 * 8)


def test_int4_weights_and_fp8_kv_change_only_their_bytes():
    base = _ops(StepShape.decode(1, 7), dtype="bfloat16")
    q = _ops(StepShape.decode(1, 7), dtype="bfloat16", weight_dtype="int4", kv_dtype="fp8")
    assert q["qkv_proj"][0] == base["qkv_proj"][0]
    assert q["qkv_proj"][1] == pytest.approx(base["qkv_proj"][1] - 2 * 128 * (2 - 0.5625))
    assert q["attention"][1] == pytest.approx(base["attention"][1] - 2 * 8 * 2 * 4 * (2 - 1))
    assert weight_bytes(TOY, "int4") == pytest.approx(weight_bytes(TOY, "bfloat16") * 0.5625 / 2)


def test_step_time_is_the_roofline_sum():
    pm = PerfModel(TOY, ROUND, dtype="float32")
    step = StepShape.prefill(64)
    v = step.stats().vector()
    expected = sum(max(op.flops_for(v) / 1e12, op.bytes_for(v) / 1e11) for op in pm.ops)
    assert pm.step_time(step) == pytest.approx(expected)
    pred = pm.predict(step)
    assert pred.total_s == pytest.approx(expected)
    assert {o.bound for o in pred.ops} <= {"compute", "memory"}
    # the weights dominate a batch-1 decode: memory-bound; overheads add exactly
    slow = HardwareSpec(**{**ROUND.to_dict(), "op_overhead_s": 1e-6, "step_overhead_s": 1e-3, "seq_overhead_s": 1e-5})
    pm2 = PerfModel(TOY, slow, dtype="float32")
    n_ops = sum(op.count for op in pm2.ops)
    assert pm2.step_time(step) == pytest.approx(expected + n_ops * 1e-6 + 1e-3 + 1e-5)
    # two shared-prefix parts: their reads saved (all of them at efficiency 1) plus 20 operators
    # per layer each
    shared = StepShape([SeqWork(1, 40)] * 4, shared_prefixes=[((0, 1), 32), ((2, 3), 16)])
    full = StepShape([SeqWork(1, 40)] * 4)
    assert shared.stats().kv_read == full.stats().kv_read - 32 - 16 and shared.stats().shared_parts == 2
    v_shared = shared.stats().vector()
    roofline = sum(max(op.flops_for(v_shared) / 1e12, op.bytes_for(v_shared) / 1e11) for op in pm2.ops)
    one = HardwareSpec(**{**slow.to_dict(), "shared_prefix_efficiency": 1.0})
    pm3 = PerfModel(TOY, one, dtype="float32")
    assert pm3.step_time(shared) == pytest.approx(
        roofline + n_ops * 1e-6 + 1e-3 + 4 * 1e-5 + 2 * 20 * TOY.num_layers * 1e-6)


def test_memory_fit_matches_the_engines_pool():
    cfg = load_model_config(None)
    pm = PerfModel(cfg, load_spec("epyc-2c"), dtype="float32", block_size=16)
    assert pm.kv_bytes_per_block == KVCachePool.bytes_per_block(cfg, 16, __import__("torch").float32)
    blocks = 20
    budget = blocks * pm.kv_bytes_per_block
    assert pm.kv_blocks(budget) == blocks
    prompt, output = 20, 44  # 64 tokens = 4 blocks each: 5 sequences fit
    assert pm.max_batch(prompt, output, budget) == 5
    engine = LLMEngine(EngineConfig.from_kwargs(dtype="float32", kv_cache_memory=budget, max_model_len=256))
    assert engine.num_kv_blocks == blocks
    params = SamplingParams(max_tokens=output, ignore_eos=True)

    def preemptions(n: int) -> int:
        before = engine.get_stats().num_preemptions
        for i in range(n):
            engine.add_request([100 + i] * prompt, params)
        while engine.has_unfinished_requests():
            engine.step()
        return engine.get_stats().num_preemptions - before

    assert preemptions(5) == 0  # exactly the predicted batch runs to the end without preemption
    assert preemptions(6) > 0  # one more does not fit


def test_registry_specs_and_bad_specs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for name in ("h100-sxm", "h200", "a100-80gb", "l4", "rtx-4090", "mi300x", "apple-m2-ultra"):
        spec = load_spec(name)
        assert spec.source and spec.memory_bandwidth > 0 and spec.peak("bfloat16") > 0
    with pytest.raises(HardwareSpecError, match="memory_bandwidth must be a positive number"):
        HardwareSpec(name="x", peak_flops={"float32": 1e12}, memory_bandwidth=-1.0, memory_capacity=1e9)
    with pytest.raises(HardwareSpecError, match="unknown hardware 'tpu-v9'"):
        load_spec("tpu-v9")
    with pytest.raises(HardwareSpecError, match="peak_flops dtype 'float64' is unknown"):
        HardwareSpec(name="x", peak_flops={"float64": 1e12}, memory_bandwidth=1e9, memory_capacity=1e9)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "peak_flops": {"float32": 1e12}, "memory_bandwidth": 1e9}))
    with pytest.raises(HardwareSpecError, match="missing fields: memory_capacity"):
        load_spec(str(bad))
    with pytest.raises(HardwareSpecError, match="run `ridgeline perf calibrate`"):
        load_spec("local")


def test_model_config_missing_fields(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "vocab_size": 10}))
    with pytest.raises(ValueError, match="missing required fields: intermediate_size, num_hidden_layers"):
        load_model_config(str(cfg))


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ridgeline.cli", *args], capture_output=True, text=True,
                          timeout=600, env=env)


def test_plan_cli(tmp_path, capsys):
    out = _cli("plan", "--hardware", "h100-sxm", "--prompt-len", "1024", "--output-len", "256",
               "--slo-ttft", "200", "--slo-tpot", "30", "--json", "--plot", str(tmp_path / "roof.png"))
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    for key in ("ttft_ms", "tpot_ms", "tokens_per_s", "max_batch"):
        assert plan[key] > 0
    assert plan["ttft_ms"] <= 200 and plan["tpot_ms"] <= 30 and plan["slo_met"]
    assert plan["tokens_per_s"] == pytest.approx(plan["batch"] * 1e3 / plan["tpot_ms"], rel=1e-3)
    assert (tmp_path / "roof.png").stat().st_size > 10_000
    # one more sequence than max_batch breaks an SLO
    over = json.loads(_cli("plan", "--hardware", "h100-sxm", "--prompt-len", "1024", "--output-len", "256",
                           "--slo-ttft", "200", "--slo-tpot", "30", "--json",
                           "--batch", str(plan["max_batch"] + 1)).stdout)
    assert not over["slo_met"] and (over["ttft_ms"] > 200 or over["tpot_ms"] > 30)
    for args, message in ((("--hardware", "nope"), "unknown hardware 'nope'"),
                          (("--hardware", "l4", "--prompt-len", "0"), "prompt_len must be an integer >= 1"),
                          (("--hardware", "l4", "--slo-tpot", "-5"), "slo_tpot_ms must be > 0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_calibrate_then_plan_local(tmp_path):
    """A short calibration (4 samples, no held-out grid) saves this machine's spec under
    local-<CPU model>-<ISA>, priced by the weights' stored format; plan --hardware local uses it."""
    import os

    from ridgeline.perf.hardware import local_spec_name

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    cal = _cli("perf", "calibrate", "--samples", "4", "--repeats", "1", "--no-holdout", "--json", env=env)
    assert cal.returncode == 0, cal.stderr
    report = json.loads(cal.stdout)
    assert len(report["samples"]) == 4 and report["mape"] is None
    assert all(s["measured_ms"] > 0 and s["predicted_ms"] > 0 for s in report["samples"])
    assert math.isfinite(report["fit_mape"])
    name = local_spec_name()
    assert name.startswith("local-") and name.endswith(("-avx512", "-avx2", "-scalar"))
    saved = json.loads((tmp_path / "ridgeline" / "hardware" / f"{name}.json").read_text())
    assert saved["calibrated"]["samples"] == 4 and saved["calibrated"]["weight_dtype"] == "q4_1"
    plan = _cli("plan", "--hardware", "local", "--json", env=env)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["hardware"] == name and json.loads(plan.stdout)["weight_dtype"] == "q4_1"
    bad = _cli("perf", "calibrate", "--samples", "11", env=env)
    assert bad.returncode == 2 and "--samples must be in [1, 10]" in bad.stderr


def test_calibration_shared_prefix_shapes_run_the_engines_hydragen_parts(monkeypatch):
    """The model prices one Hydragen part per shared prefix of a step shape; the shapes that
    calibrate and check that price must make the real engine run exactly those parts (counted in
    the attention metadata the model runner builds), and leave no block held after the step."""
    from ridgeline import model_runner
    from ridgeline.perf.calibrate import CALIBRATION_SHAPES, EngineStepTimer, holdout_grid

    shapes = [(label, s) for label, s in CALIBRATION_SHAPES + holdout_grid() if s.shared_prefixes]
    assert any(len(s.shared_prefixes) > 1 for _, s in CALIBRATION_SHAPES), "a multi-part calibration sample"
    parts: list[int] = []

    def counting(*args, **kwargs):
        meta = build(*args, **kwargs)
        parts.append(len(meta.decode.prefix_parts or []))
        return meta

    build = model_runner.build_metadata
    monkeypatch.setattr(model_runner, "build_metadata", counting)
    kv = max(sum(w.context_len + w.new_tokens + 16 for w in s.seqs) for _, s in shapes)
    timer = EngineStepTimer(dtype="bfloat16", kv_tokens=kv, repeats=1)
    for label, shape in shapes:
        parts.clear()
        timer.run_step(shape)
        assert parts == [len(shape.shared_prefixes)], label
        assert timer.kv_usage == 0, label


def test_gguf_formats_priced_by_their_bytes_per_weight():
    """Q4_K is 144 bytes per 256 weights (4.5 bits), Q6_K 210 / 256, Q8_0 34 / 32; a GGUF is planned
    with the format holding most of its matrix bytes (the default model: Q4_1), as the engine keeps it."""
    from ridgeline.loader import stored_weight_format

    f32 = weight_bytes(TOY, "float32")
    for fmt, bits in (("q4_k", 4.5), ("q6_k", 6.5625), ("q8_0", 8.5), ("q4_1", 5.0), ("q5_k", 5.5)):
        assert weight_bytes(TOY, fmt) == pytest.approx(f32 * bits / 32)
    assert stored_weight_format(None) == "q4_1"
    q = _ops(StepShape.decode(1, 7), dtype="float32", weight_dtype="q4_k")
    dense = _ops(StepShape.decode(1, 7), dtype="float32")
    assert q["qkv_proj"][0] == dense["qkv_proj"][0]
    assert q["qkv_proj"][1] == pytest.approx(dense["qkv_proj"][1] - 2 * 128 * (4 - 0.5625))


def test_speculative_speedup_where_memory_bound_and_none_where_compute_bound():
    """The default model's float32 weights on ROUND (no overheads): batch 1 reads 0.5 GB of weights
    for ~0.3 GFLOP, so verifying 4 proposals costs hardly more than one token and high acceptance
    pays ~4x; batch 256 at a short context is compute-bound, where every verified row costs its
    full share and no k beats not speculating (the policy's k = 0, speedup exactly 1). (At long
    contexts the sequences' K/V reads, shared by their k + 1 rows, keep speculation paying.)"""
    from ridgeline.core.spec_policy import expected_tokens, speedup
    from ridgeline.perf.plan import spec_step_time, speculative_plan

    pm = PerfModel(load_model_config(None), ROUND, dtype="float32")
    context = 64
    assert pm.predict(StepShape.decode(1, context)).bound == "memory"
    assert pm.predict(StepShape.decode(256, context)).bound == "compute"
    one, big = speculative_plan(pm, context, acceptance=0.9, max_k=4, batches=(1, 256))
    assert one.batch == 1 and one.best_k == 4
    assert 3 < one.speedup <= expected_tokens(0.9, 4)
    step = spec_step_time(pm)
    assert one.speedup == pytest.approx(speedup(step, 1, context, 4, 0.9))
    assert big.batch == 256 and big.best_k == 0 and big.speedup == 1.0 and big.speedup_max_k < 1
    # the verifying step is a decode step when n = 1, and prices lm_head and sampling on all n
    # rows (a prefill chunk of n tokens has logits for its last one only)
    assert step(8, context, 1) == pytest.approx(pm.step_time(StepShape.decode(8, context)))
    chunk = pm.step_time(StepShape([SeqWork(5, context)] * 8))
    assert step(8, context, 5) > chunk
    # a draft model's cost comes out of the gain
    drafted = speculative_plan(pm, context, acceptance=0.9, max_k=4, draft_cost=0.2, batches=(1,))[0]
    assert 1 < drafted.speedup < one.speedup
    for kwargs, message in ((dict(acceptance=1.0), "acceptance must be a number in \\(0, 1\\)"),
                            (dict(acceptance=0.0), "acceptance"), (dict(acceptance=0.5, max_k=0), "num_speculative")):
        with pytest.raises(ValueError, match=message):
            speculative_plan(pm, context, **kwargs)


def test_plan_cli_speculative(tmp_path, capsys):
    spec = tmp_path / "round.json"
    spec.write_text(json.dumps({**ROUND.to_dict(), "memory_capacity": 80e9}))
    common = ("plan", "--hardware", str(spec), "--dtype", "float32", "--weight-dtype", "float32")
    out = _cli(*common, "--prompt-len", "32", "--output-len", "64", "--speculative", "ngram", "--acceptance", "0.9",
               "--batch", "256", "--json")
    assert out.returncode == 0, out.stderr
    sp = json.loads(out.stdout)["speculative"]
    assert sp["method"] == "ngram" and sp["acceptance"] == 0.9 and sp["num_speculative_tokens"] == 4
    assert sp["draft_cost"] == 0 and sp["context"] == 32 + 32
    rows = {r["batch"]: r for r in sp["batches"]}
    assert sorted(rows) == [1, 2, 4, 8, 16, 32, 64, 256]  # the usual sizes plus --batch
    assert rows[1]["best_k"] == 4 and rows[1]["speedup"] > 1
    assert rows[256]["best_k"] == 0 and rows[256]["speedup"] == 1.0
    assert [r["speedup"] for r in sp["batches"]] == sorted((r["speedup"] for r in sp["batches"]), reverse=True)
    # a draft model: the default model drafting for itself costs a whole target step per proposal
    # (the same weight bytes), so nothing pays
    from ridgeline.loader import default_model_path

    text = _cli("plan", "--hardware", str(spec), "--dtype", "float32", "--speculative", "draft",
                "--acceptance", "0.9", "--draft-model", str(default_model_path()))
    assert text.returncode == 0, text.stderr
    assert "speculative decoding (draft): acceptance 0.9, k <= 4, draft cost 1 of a target step" in text.stdout
    table = text.stdout.split("speculative decoding (draft)")[1].strip().splitlines()[2:]
    assert len(table) == 7 and all(line.split()[2:4] == ["0", "1.00"] for line in table), text.stdout
    for args, message in ((("--speculative", "ngram", "--acceptance", "1"), "--acceptance must be in (0, 1)"),
                          (("--speculative", "ngram", "--acceptance", "0"), "--acceptance must be in (0, 1)"),
                          (("--speculative", "ngram"), "--speculative needs --acceptance"),
                          (("--acceptance", "0.5"), "--acceptance needs --speculative"),
                          (("--speculative", "draft", "--acceptance", "0.5"), "exactly one of --draft-model"),
                          (("--speculative", "ngram", "--acceptance", "0.5", "--draft-cost", "0.1"),
                           "apply to --speculative draft only"),
                          (("--speculative", "draft", "--acceptance", "0.5", "--draft-model", "/nope.gguf"),
                           "--draft-model: '/nope.gguf' does not exist"),
                          (("--speculative", "ngram", "--acceptance", "0.5", "--num-speculative-tokens", "0"),
                           "--num-speculative-tokens must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", "--hardware", "l4", *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
