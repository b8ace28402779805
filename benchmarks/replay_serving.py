"""Replay the serving benchmark's workload on `LLMEngine` directly (no HTTP): a closed loop of C
requests in flight from the prefix-repetition dataset, timing every step and predicting it with
the performance model. Separates engine effects from server effects, and checks the model
step by step on a real schedule.

    .venv/bin/python benchmarks/replay_serving.py --concurrency 8 --prompts 32 [--hardware local]
        [--no-hydragen] [--no-prefix-caching] [--min-saved-tokens 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

from ridgeline.bench.datasets import prefix_repetition_dataset
from ridgeline.core.config import EngineConfig
from ridgeline.engine import LLMEngine
from ridgeline.perf import PerfModel, SeqWork, StepShape, load_spec
from ridgeline.sampling_params import SamplingParams

OUTPUT_LEN = 64


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--hardware", default="local")
    ap.add_argument("--no-hydragen", action="store_true")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--min-saved-tokens", type=int, default=512)
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig.from_kwargs(kv_cache_memory="2GiB", enable_hydragen=not args.no_hydragen,
                                                enable_prefix_caching=not args.no_prefix_caching,
                                                hydragen_min_saved_tokens=args.min_saved_tokens))
    pm = PerfModel(engine.model_config, load_spec(args.hardware))
    engine.add_request("warm up", SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        engine.step()

    shapes: list[StepShape] = []
    schedule = engine._scheduler.schedule
    bs = engine.block_size

    def recording_schedule():
        """The step's shape as the model runner gets it (decode rows first), with the shared
        prefixes Hydragen attends once (the scheduler's grouping on the real block tables)."""
        out = schedule()
        shapes.append(StepShape([SeqWork(s.num_new_tokens, s.start, s.sample) for s in out.seqs],
                                shared_prefixes=[(tuple(p.rows), len(p.blocks) * bs) for p in out.shared_prefixes]))
        return out

    engine._scheduler.schedule = recording_schedule
    pending = prefix_repetition_dataset(args.prompts, 256, 32, 4, OUTPUT_LEN, seed=100 + args.concurrency)
    params = SamplingParams(max_tokens=OUTPUT_LEN, ignore_eos=True, temperature=0.0)
    start, ttft, e2e, steps = {}, {}, {}, []
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and len(engine.request_ids()) < args.concurrency:
            rid = engine.add_request(pending.pop(0).prompt, params)
            start[rid] = time.perf_counter()
        t = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        if shapes[-1].seqs:
            steps.append((now - t, pm.step_time(shapes[-1]), all(w.new_tokens == 1 for w in shapes[-1].seqs)))
        for out in outputs:
            if out.request_id not in ttft and out.outputs[0].token_ids:
                ttft[out.request_id] = now - start[out.request_id]
            if out.finished:
                e2e[out.request_id] = now - start[out.request_id]
    wall = time.perf_counter() - t0
    measured, predicted = sum(s[0] for s in steps), sum(s[1] for s in steps)
    tpot = statistics.fmean((e2e[r] - ttft[r]) / (OUTPUT_LEN - 1) for r in e2e)
    print(f"concurrency {args.concurrency}: {len(steps)} steps, {args.prompts * OUTPUT_LEN / wall:.1f} output tok/s, "
          f"mean TTFT {1e3 * statistics.fmean(ttft.values()):.0f} ms, mean TPOT {1e3 * tpot:.1f} ms, "
          f"hydragen steps {engine.get_stats().hydragen_steps}")
    print(f"step time: measured {measured:.2f} s, predicted {predicted:.2f} s ({100 * (predicted - measured) / measured:+.1f}%)")
    for label, keep in (("decode-only", True), ("with prefill", False)):
        part = [s for s in steps if s[2] == keep]
        if part:
            print(f"  {label} steps {len(part)}: measured {1e3 * statistics.fmean(s[0] for s in part):.1f} ms, "
                  f"predicted {1e3 * statistics.fmean(s[1] for s in part):.1f} ms")


if __name__ == "__main__":
    main()
