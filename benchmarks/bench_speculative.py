"""Speculative decoding against plain decoding, on the default model, in one process.

Workloads (greedy, so the outputs, and their lengths, are the same with and without):
  - grounded: chat requests to edit a given passage (rewrite it with a substitution, fix its
    spelling, repeat it), one after another, each a single stream: the answer copies most of
    the input, which is where n-gram lookup finds its matches;
  - code file: a chat request to reproduce a 2.4k-character code file with a rename. Kept as a
    counter-example: the 135M default model does not copy the file (it describes it, then
    repeats itself), so proposals come only from its own repetitions;
  - chat: a free-form chat request (single stream);
  - draft: the default model's quantized GGUF drafting for the same model dequantized to
    float32 (same vocabulary), on the grounded and chat requests (single stream);
  - streams: 32 concurrent chat requests.
Each workload runs speculative and plain alternately `--repeats` times; the table gives the
median decode tok/s of each (single streams: tokens after the first over the time after the
first token; 32 streams: output tokens over wall time), their ratio, the acceptance rate and
mean accepted length.

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
CODE_FILE = ROOT / "ridgeline" / "core" / "kv_blocks.py"
CHAT_QUESTIONS = ["Tell me a story about a dragon who learns to bake bread.",
                  "What are the main differences between cats and dogs as pets?",
                  "Describe a walk through a forest in autumn.",
                  "Explain how a bicycle works to a ten-year-old."]
PASSAGES = [
    "The river runs through the valley past the old mill, where the miller's family has ground wheat for three "
    "generations. Every spring the snow melts on the mountains and the water rises, and every autumn the farmers "
    "bring their harvest down the narrow road to the mill. The children of the village learn to swim in the pool "
    "below the waterfall, and the old men sit on the bridge in the evening and talk about the weather.",
    "Our office will be closed on Monday for the public holiday. Orders placed over the weekend will be shipped on "
    "Tuesday morning, and the support team will answer emails in the order they arrived. If your order is urgent, "
    "please call the main number and leave a message with your order number and a phone number where we can reach "
    "you.",
]


def grounded_requests() -> list[list[dict]]:
    """Three edits of each passage: a substitution, a spelling fix (typos put in), a verbatim repeat."""
    edits = []
    for text in PASSAGES:
        typos = text.replace("ea", "ae", 2).replace("ou", "uo", 1)
        edits += [f"Rewrite this text, replacing 'the' with 'a' where it reads well:\n\n{text}",
                  f"Fix the spelling in this text and write it out in full:\n\n{typos}",
                  f"Repeat the following text exactly:\n\n{text}"]
    return [[{"role": "user", "content": e}] for e in edits]


def code_file_messages() -> list[dict]:
    code = CODE_FILE.read_text()[:2400]
    return [{"role": "user", "content": "Here is a Python file:\n\n```python\n" + code + "\n```\n\n"
             "Repeat the file exactly, but rename the class BlockAllocator to BlockPool."}]


def run(llm: LLM, prompts: list, max_tokens: int, together: bool, ignore_eos: bool = True) -> float:
    """Decode tok/s. One at a time: the tokens after each request's first over the time after
    its first token (the prefill is the same with and without). Together: output tokens over wall time."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
    if together:
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False, prefix_aware=False)
        return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)
    tokens = seconds = 0.0
    for prompt in prompts:
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        tokens += len(out.outputs[0].token_ids) - 1
        seconds += out.metrics["finish_time"] - out.metrics["first_token_time"]
    return tokens / seconds


def measure(plain: LLM, spec: LLM, prompts: list, max_tokens: int, repeats: int, together: bool = False,
            ignore_eos: bool = True) -> dict:
    base, fast = [], []
    before = spec.get_stats()
    for _ in range(repeats):
        fast.append(run(spec, prompts, max_tokens, together, ignore_eos))
        base.append(run(plain, prompts, max_tokens, together, ignore_eos))
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
    ap.add_argument("--only", default="grounded,code,chat,draft,streams")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    only = set(args.only.split(","))
    results = {}
    common = dict(max_model_len=4096)
    if only & {"grounded", "code", "chat", "streams"}:
        plain = LLM(**common)
        spec = LLM(**common, speculative="ngram", num_speculative_tokens=args.k)
        grounded = [plain.render_chat(m) for m in grounded_requests()]
        chats = [plain.render_chat([{"role": "user", "content": q}]) for q in CHAT_QUESTIONS]
        # the edits end where the passage does: stopping at EOS, both runs emit the same tokens
        if "grounded" in only:
            results["ngram, grounded (6 passage edits)"] = measure(plain, spec, grounded, 2 * args.max_tokens,
                                                                   args.repeats, ignore_eos=False)
        if "code" in only:
            results["ngram, code file (not copied)"] = measure(plain, spec, [plain.render_chat(code_file_messages())],
                                                               args.max_tokens, args.repeats)
        if "chat" in only:
            results["ngram, chat"] = measure(plain, spec, chats[:1], args.max_tokens, args.repeats)
        if "streams" in only:
            results["ngram, 32 streams"] = measure(plain, spec, (chats * 8)[:32], 64, args.repeats, together=True)
        del plain, spec
    if "draft" in only:
        dense = dict(common, dtype="float32", quantization="none")
        plain = LLM(**dense)
        spec = LLM(**dense, speculative=str(default_model_path()), num_speculative_tokens=args.k)
        results["draft, grounded (3 passage edits)"] = measure(
            plain, spec, [plain.render_chat(m) for m in grounded_requests()[:3]], 2 * args.max_tokens, args.repeats,
            ignore_eos=False)
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
