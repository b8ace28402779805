"""Speculative decoding against plain decoding, on the default model, in one process.

Workloads (greedy, the same output length with and without):
  - grounded: a chat request to reproduce a given code file with small edits, where n-gram
    lookup finds long matches (single stream);
  - chat: free-form chat requests (single stream);
  - draft: the default model's quantized GGUF drafting for the same model dequantized to
    float32 (same vocabulary), on the grounded and chat requests (single stream);
  - streams: 32 concurrent chat requests.
Each workload runs speculative and plain alternately `--repeats` times; the table gives the
median decode tok/s of each (single stream: after the first token; 32 streams: output tokens
over wall time), their ratio, the acceptance rate and mean accepted length.

    .venv/bin/python benchmarks/bench_speculative.py [--repeats 3] [--k 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from ridgeline import LLM, SamplingParams
from ridgeline.loader import default_model_path

ROOT = Path(__file__).resolve().parents[1]
GROUNDED_FILE = ROOT / "ridgeline" / "core" / "kv_blocks.py"
CHAT_QUESTIONS = ["Tell me a story about a dragon who learns to bake bread.",
                  "What are the main differences between cats and dogs as pets?",
                  "Describe a walk through a forest in autumn.",
                  "Explain how a bicycle works to a ten-year-old."]


def grounded_messages() -> list[dict]:
    code = GROUNDED_FILE.read_text()[:2400]
    return [{"role": "user", "content": "Here is a Python file:\n\n```python\n" + code + "\n```\n\n"
             "Repeat the file exactly, but rename the class BlockAllocator to BlockPool."}]


def run(llm: LLM, prompts: list, max_tokens: int) -> float:
    """Decode tok/s: one request, its tokens after the first over the time after the first (the
    prompt's prefill is the same with and without); several, output tokens over wall time."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False, prefix_aware=False)
    elapsed = time.perf_counter() - t
    if len(outs) == 1:
        m = outs[0].metrics
        return (len(outs[0].outputs[0].token_ids) - 1) / (m["finish_time"] - m["first_token_time"])
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def measure(plain: LLM, spec: LLM, prompts: list, max_tokens: int, repeats: int) -> dict:
    base, fast = [], []
    before = spec.get_stats()
    for _ in range(repeats):
        fast.append(run(spec, prompts, max_tokens))
        base.append(run(plain, prompts, max_tokens))
    after = spec.get_stats()
    drafts = after.spec_decode_num_drafts - before.spec_decode_num_drafts
    proposed = after.spec_decode_num_draft_tokens - before.spec_decode_num_draft_tokens
    accepted = after.spec_decode_num_accepted_tokens - before.spec_decode_num_accepted_tokens
    b, f = statistics.median(base), statistics.median(fast)
    return {"plain_tok_s": b, "spec_tok_s": f, "ratio": f / b, "acceptance_rate": accepted / max(1, proposed),
            "mean_accepted_length": 1 + accepted / max(1, drafts), "proposed_per_step": proposed / max(1, drafts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=4, help="--num-speculative-tokens (the most per step)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--only", default="grounded,chat,draft,streams")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    only = set(args.only.split(","))
    results = {}
    common = dict(max_model_len=4096)
    if only & {"grounded", "chat", "streams"}:
        plain = LLM(**common)
        spec = LLM(**common, speculative="ngram", num_speculative_tokens=args.k)
        grounded = [plain.render_chat(grounded_messages())]
        chats = [plain.render_chat([{"role": "user", "content": q}]) for q in CHAT_QUESTIONS]
        if "grounded" in only:
            results["ngram, grounded"] = measure(plain, spec, grounded, args.max_tokens, args.repeats)
        if "chat" in only:
            results["ngram, chat"] = measure(plain, spec, chats[:1], args.max_tokens, args.repeats)
        if "streams" in only:
            results["ngram, 32 streams"] = measure(plain, spec, (chats * 8)[:32], 64, args.repeats)
        del plain, spec
    if "draft" in only:
        dense = dict(common, dtype="float32", quantization="none")
        plain = LLM(**dense)
        spec = LLM(**dense, speculative=str(default_model_path()), num_speculative_tokens=args.k)
        results["draft, grounded"] = measure(plain, spec, [plain.render_chat(grounded_messages())],
                                             args.max_tokens, args.repeats)
        results["draft, chat"] = measure(plain, spec, [plain.render_chat([{"role": "user", "content": CHAT_QUESTIONS[0]}])],
                                         args.max_tokens, args.repeats)
    print(f"{platform.processor() or platform.machine()}; k <= {args.k}; median of {args.repeats}")
    print("| workload | plain tok/s | speculative tok/s | ratio | acceptance | mean accepted length |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | {r['ratio']:.2f}x | "
              f"{r['acceptance_rate']:.2f} | {r['mean_accepted_length']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
