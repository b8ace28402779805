"""Constrained vs unconstrained decode step time at batch 1 and 32, in one process.

Each trial runs a batch of identical chat prompts for `--steps` decode steps (after the prefill),
once with a JSON schema whose shortest valid document is longer than the run (so every step is
masked) and once without (ignore_eos, so the batch stays full), then with the mask computed in
the engine thread instead of overlapped with the forward. Trials alternate so that machine noise
hits all modes alike; the report is each mode's median (and minimum) step time over trials and
its ratio to the unconstrained one's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_structured.py [--batches 1 32] [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

from ridgeline import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                   "items": {"type": "array", "minItems": 40, "items": {
                       "type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                                        "qty": {"type": "integer", "minimum": 1, "maximum": 99},
                                                        "unit": {"enum": ["kg", "pcs", "l"]}},
                       "required": ["name", "qty", "unit"], "additionalProperties": False}}},
    "required": ["order_id", "items"], "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Write a grocery order as JSON with many items."}]


def step_time(llm: LLM, batch: int, steps: int, constrained: bool, seed: int) -> float:
    """Median seconds per decode step over `steps` steps of a full batch."""
    engine = llm.engine
    prompt = llm.engine.inputs.chat_prompt(MESSAGES)
    so = {"json": SCHEMA} if constrained else None
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=steps + 8, ignore_eos=True, structured_outputs=so)
    for i in range(batch):
        engine.add_request(prompt, params, request_id=f"b{seed}-{i}")
    while any(len(o.outputs[0].token_ids) == 0 for o in engine.step()):  # prefill (prompt cached after the first)
        pass
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    for rid in engine.request_ids():
        engine.abort_request(rid)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    llm = LLM(max_model_len=1024, kv_cache_memory="256MiB")
    grammar = llm.engine.runner.grammar
    grammar.overlap_min_rows = 1  # measure the worker thread at batch 1 too
    step_time(llm, 1, 4, True, 0)  # warm up: llguidance's tokenizer, the schema's compile, the kernels
    for batch in args.batches:
        modes: dict[str, list[float]] = {"unconstrained": [], "constrained (overlapped)": [],
                                         "constrained (not overlapped)": []}
        for t in range(args.trials):
            modes["unconstrained"].append(step_time(llm, batch, args.steps, False, t))
            grammar.overlap = True
            modes["constrained (overlapped)"].append(step_time(llm, batch, args.steps, True, t))
            grammar.overlap = False
            modes["constrained (not overlapped)"].append(step_time(llm, batch, args.steps, True, t))
            grammar.overlap = True
        base, base_min = statistics.median(modes["unconstrained"]), min(modes["unconstrained"])
        for name, ts in modes.items():
            med = statistics.median(ts)
            print(f"batch {batch:>2} {name:<29} median {med * 1e3:7.2f} ms/step x{med / base:.3f}, "
                  f"min {min(ts) * 1e3:7.2f} x{min(ts) / base_min:.3f}  "
                  f"(trials: {', '.join(f'{x * 1e3:.2f}' for x in ts)})", flush=True)


if __name__ == "__main__":
    main()
