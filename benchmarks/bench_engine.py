"""ridgeline against transformers' generate() on the default model, in one process.

Measures, for one dtype (default: bfloat16, ridgeline's default on this CPU):
  - prefill tok/s for a 512-token prompt (time to the first token),
  - single-stream decode tok/s over 128 tokens (the prefill time subtracted),
  - batched throughput for 32 prompts x 128 output tokens (output tokens / wall time),
  - decode as a fraction of the memory-bandwidth roofline: weight bytes read per decoded
    token x tok/s / the bandwidth measured here (a 1 GiB reduction).
Each number is the median of --repeats runs; ratios are ridgeline / transformers.

    .venv/bin/python benchmarks/bench_engine.py [--dtype bfloat16|float32] [--quantization none|int4] [--repeats 3]
        [--no-cpu-kernels] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from timing import median_time

from ridgeline import LLM, SamplingParams
from ridgeline.loader import default_model_path

PREFILL_LEN = 512
DECODE_LEN = 128
BATCH = 32


def measure_bandwidth_gbs(repeats: int = 5) -> float:
    """Read bandwidth of a 1 GiB float32 reduction, the best of a few runs."""
    x = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def weight_bytes_per_token(llm: LLM) -> int:
    """Bytes of weights a decode step reads: every layer's matrices and norms, the final norm and the
    lm_head (the input embedding contributes one row, negligible)."""
    mc = llm.engine.model_config
    elem = torch.finfo(llm.engine.dtype).bits // 8
    h, i = mc.hidden_size, mc.intermediate_size
    linear = h * (mc.q_size + 2 * mc.kv_size) + mc.q_size * h + 3 * h * i
    # int4: 4-bit values plus a bf16 scale and zero per 32 weights = 0.625 bytes per weight
    int4 = type(llm.engine.model.layers[0].qkv).__name__ == "Int4Linear"
    linear_bytes = linear * (0.625 if int4 else elem)
    return int(mc.num_layers * (linear_bytes + 2 * h * elem) + elem * (h + mc.vocab_size * h))


def prompt_of_length(tok, n: int) -> list[int]:
    text = ("The river carried the old boat past fields of wheat and quiet villages, "
            "and the boatman sang songs about the mountains he had never seen. ") * 64
    ids = tok.encode(text)
    assert len(ids) >= n
    return ids[:n]


def batch_prompts(tok) -> list[list[int]]:
    topics = ["the sea", "a city at night", "learning to cook", "an old library", "winter birds",
              "a chess match", "the first computer", "a mountain village"]
    texts = [f"Write a story about {topics[i % len(topics)]}, chapter {i + 1}:" for i in range(BATCH)]
    return [tok.encode(t) for t in texts]


def bench_ridgeline(llm: LLM, repeats: int) -> dict:
    tok = llm.get_tokenizer()
    long_prompt = {"prompt_token_ids": prompt_of_length(tok, PREFILL_LEN)}
    short_prompt = {"prompt_token_ids": tok.encode("The history of the printing press")}
    one = SamplingParams(temperature=0, max_tokens=1)
    many = SamplingParams(temperature=0, max_tokens=DECODE_LEN, ignore_eos=True)
    run = lambda prompts, p: llm.generate(prompts, p, use_tqdm=False)  # noqa: E731

    run([short_prompt], many)  # warm-up
    prefill = median_time(lambda: run([long_prompt], one), repeats)
    first = median_time(lambda: run([short_prompt], one), repeats)
    full = median_time(lambda: run([short_prompt], many), repeats)
    prompts = [{"prompt_token_ids": ids} for ids in batch_prompts(tok)]
    batched = median_time(lambda: run(prompts, many), repeats)
    return {"prefill_tok_s": PREFILL_LEN / prefill, "decode_tok_s": (DECODE_LEN - 1) / (full - first),
            "batched_tok_s": BATCH * DECODE_LEN / batched}


@torch.inference_mode()
def bench_transformers(model, tok, repeats: int) -> dict:
    def gen(ids_batch: list[list[int]], new_tokens: int):
        width = max(len(x) for x in ids_batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids_batch])  # left padding
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids_batch])
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=pad)
        assert out.shape[1] == width + new_tokens

    long_ids = prompt_of_length(tok, PREFILL_LEN)
    short_ids = tok.encode("The history of the printing press")
    gen([short_ids], 8)  # warm-up
    prefill = median_time(lambda: gen([long_ids], 1), repeats)
    first = median_time(lambda: gen([short_ids], 1), repeats)
    full = median_time(lambda: gen([short_ids], DECODE_LEN), repeats)
    batched = median_time(lambda: gen(batch_prompts(tok), DECODE_LEN), repeats)
    return {"prefill_tok_s": PREFILL_LEN / prefill, "decode_tok_s": (DECODE_LEN - 1) / (full - first),
            "batched_tok_s": BATCH * DECODE_LEN / batched}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantization", default="none", choices=["none", "int4"],
                    help="ridgeline's weights (int4: bf16 only)")
    ap.add_argument("--no-cpu-kernels", dest="cpu_kernels", action="store_false",
                    help="ridgeline with PyTorch ops only (no fused C kernels), for A/B runs")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)

    # Prefix caching off: the repeated prompts would otherwise be cached after the first run.
    llm = LLM(dtype=args.dtype, max_model_len=2048, kv_cache_memory="1GiB", enable_prefix_caching=False,
              quantization=args.quantization, cpu_kernels=args.cpu_kernels)
    cpu_kernels = llm.engine.model.kernels is not None
    ours = bench_ridgeline(llm, args.repeats)
    bytes_per_token = weight_bytes_per_token(llm)
    tok = llm.get_tokenizer()
    del llm

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    theirs = bench_transformers(model, tok, args.repeats)
    del model

    bandwidth = measure_bandwidth_gbs()
    roof = bandwidth * 1e9 / bytes_per_token
    result = {
        "dtype": args.dtype, "quantization": args.quantization, "cpu_kernels": cpu_kernels, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats, "ridgeline": ours, "transformers": theirs,
        "ratio": {k: ours[k] / theirs[k] for k in ours},
        "bandwidth_gb_s": bandwidth, "weight_bytes_per_token": bytes_per_token,
        "decode_roofline_tok_s": roof,
        "decode_roofline_fraction": {"ridgeline": ours["decode_tok_s"] / roof,
                                     "transformers": theirs["decode_tok_s"] / roof},
    }
    print(f"dtype {args.dtype}, quantization {args.quantization}, cpu kernels {'on' if cpu_kernels else 'off'}, "
          f"{result['threads']} threads, "
          f"median of {args.repeats}")
    print(f"{'metric':<34}{'ridgeline':>12}{'transformers':>14}{'ratio':>8}")
    names = {"prefill_tok_s": f"prefill tok/s ({PREFILL_LEN}-token prompt)",
             "decode_tok_s": f"decode tok/s (1 stream, {DECODE_LEN})",
             "batched_tok_s": f"batched tok/s ({BATCH} x {DECODE_LEN})"}
    for k, label in names.items():
        print(f"{label:<34}{ours[k]:>12.1f}{theirs[k]:>14.1f}{ours[k] / theirs[k]:>7.1f}x")
    print(f"memory bandwidth {bandwidth:.1f} GB/s; weights read per token {bytes_per_token / 1e6:.0f} MB; "
          f"decode roofline {roof:.0f} tok/s; ridgeline at {result['decode_roofline_fraction']['ridgeline']:.0%}, "
          f"transformers at {result['decode_roofline_fraction']['transformers']:.0%}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
