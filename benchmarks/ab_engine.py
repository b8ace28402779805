"""A/B of the engine between two checkouts, one process each (run it alternately, interleaved).

    .venv/bin/python benchmarks/ab_engine.py PATH_TO_CHECKOUT
Prints the median of 3 runs: single-stream decode tok/s (128 greedy tokens) and the output
tok/s of 32 prompts x 64 tokens, on the default model and dtype.
"""
import sys, time, json
sys.path.insert(0, sys.argv[1])
from ridgeline import LLM, SamplingParams
llm = LLM(max_model_len=2048)
p1 = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
prompts = [f"Write a long story about the number {i} and its friends." for i in range(32)]
p32 = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
llm.generate(["warm up"], SamplingParams(max_tokens=8), use_tqdm=False)
res = {"single": [], "batch32": []}
for _ in range(3):
    t = time.perf_counter(); llm.generate(["The history of the Roman empire"], p1, use_tqdm=False); res["single"].append(128 / (time.perf_counter() - t))
    t = time.perf_counter(); llm.generate(prompts, p32, use_tqdm=False, prefix_aware=False); res["batch32"].append(32 * 64 / (time.perf_counter() - t))
print(json.dumps({k: sorted(v)[1] for k, v in res.items()}))
