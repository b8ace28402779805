"""Shared-prefix serving on the default model: Hydragen, prefix caching, prefix-aware batching.

Sections (all by default; --section picks some):
  threshold  decode attention alone, Hydragen vs ordinary, over group sizes and prefix lengths:
             where the shared-prefix path starts to pay (sets hydragen_min_saved_tokens).
  decode     decode throughput against batch size (1, 8, 32, 64) at shared prefix lengths 512, 2048
             and 6144: ridgeline with Hydragen on, off, and transformers (prefix computed once and its
             KV cache repeated over the batch, then plain batched decode).
  ttft       time to first token of a request whose 2,000-token prefix is cached vs not.
  batch      offline throughput of 256 requests drawn from 8 shared prefixes, prefix-aware
             ordering vs plain FCFS, in a KV pool too small to keep every prefix cached.

    .venv/bin/python benchmarks/bench_prefix.py [--section decode ttft ...] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from timing import median_time

from ridgeline import LLM, SamplingParams
from ridgeline.attention import build_metadata, paged_attention
from ridgeline.core.config import HydragenConfig
from ridgeline.loader import default_model_path

DTYPE = "bfloat16"
DECODE_STEPS = 8
BATCHES = (1, 8, 32, 64)
PREFIXES = (512, 2048, 6144)


def text_ids(tok, n: int, seed: int = 0) -> list[int]:
    """n token ids of varied English text (a different text per seed)."""
    rng = random.Random(seed)
    words = ("river mountain city library winter garden engine market science music ocean forest "
             "history language bridge harvest signal window journey letter").split()
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(" ".join(rng.choice(words) for _ in range(64)), add_special_tokens=False)
    return ids[:n]


# ---------------------------------------------------------------- threshold

def section_threshold(repeats: int) -> list[dict]:
    hq, hkv, d, bs = 9, 3, 64, 16
    dt = torch.bfloat16
    rows = []
    print("\n[threshold] decode attention per layer, Hydragen vs ordinary (us), own suffix 16 tokens; "
          "saved = (group - 1) x prefix")
    print(f"{'group':>6}{'prefix':>8}{'saved':>7}{'ordinary':>10}{'hydragen':>10}{'speed-up':>10}")
    for group in (2, 4, 8, 32):
        for prefix in (16, 64, 128, 256, 512, 1024):
            g = torch.Generator().manual_seed(group * prefix)
            shared = list(range(prefix // bs))
            nxt = len(shared)
            tables, starts = [], []
            for _ in range(group):
                own = -(-(prefix + 17) // bs) - len(shared)
                tables.append(shared + list(range(nxt, nxt + own)))
                nxt += own
                starts.append(prefix + 16)
            k = torch.randn(nxt * bs, hkv, d, generator=g).to(dt)
            v = torch.randn(nxt * bs, hkv, d, generator=g).to(dt)
            q = torch.randn(group, hq, d, generator=g).to(dt)
            cpu = torch.device("cpu")
            plain = build_metadata(tables, starts, [1] * group, bs, None, cpu)
            hyd = build_metadata(tables, starts, [1] * group, bs, None, cpu, HydragenConfig(min_saved_tokens=1))
            iters = 20
            t_plain = median_time(lambda: [paged_attention(q, k, v, plain, d ** -0.5) for _ in range(iters)], repeats)
            t_hyd = median_time(lambda: [paged_attention(q, k, v, hyd, d ** -0.5) for _ in range(iters)], repeats)
            row = {"group": group, "prefix": prefix, "ordinary_us": t_plain / iters * 1e6,
                   "hydragen_us": t_hyd / iters * 1e6}
            rows.append(row)
            print(f"{group:>6}{prefix:>8}{(group - 1) * prefix:>7}{row['ordinary_us']:>10.0f}{row['hydragen_us']:>10.0f}"
                  f"{t_plain / t_hyd:>9.2f}x")
    return rows


# ---------------------------------------------------------------- decode

def ridgeline_decode(llm: LLM, tok, prefix: list[int], batch: int, repeats: int) -> float:
    """Decode tok/s of `batch` sequences sharing `prefix` (cached), each with its own 4-token suffix."""
    prompts = [{"prompt_token_ids": prefix + text_ids(tok, 4, seed=1000 + i)} for i in range(batch)]
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)  # cache the prefix
    first = SamplingParams(temperature=0, max_tokens=1)
    more = SamplingParams(temperature=0, max_tokens=1 + DECODE_STEPS, ignore_eos=True)
    t1 = median_time(lambda: llm.generate(prompts, first, use_tqdm=False), repeats)
    t2 = median_time(lambda: llm.generate(prompts, more, use_tqdm=False), repeats)
    return batch * DECODE_STEPS / (t2 - t1)


@torch.inference_mode()
def transformers_decode(model, tok, prefix: list[int], batch: int, repeats: int) -> float:
    """The prefix is run once and its KV cache repeated over the batch; then greedy batched decode
    of DECODE_STEPS tokens (timed) after one step over the 4-token suffixes (not timed)."""
    import copy

    base = model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
    suffix = torch.tensor([text_ids(tok, 4, seed=1000 + i) for i in range(batch)])

    def run() -> float:
        cache = copy.deepcopy(base)
        cache.batch_repeat_interleave(batch)
        out = model(input_ids=suffix, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(DECODE_STEPS):
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t

    return batch * DECODE_STEPS / statistics.median(run() for _ in range(repeats))


def section_decode(repeats: int, batches: tuple[int, ...], prefixes: tuple[int, ...]) -> list[dict]:
    engines = {name: LLM(dtype=DTYPE, max_model_len=8192, kv_cache_memory="3GiB", max_num_seqs=64,
                         enable_hydragen=on) for name, on in (("hydragen", True), ("no_hydragen", False))}
    tok = engines["hydragen"].get_tokenizer()
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=getattr(torch, DTYPE)).eval()
    rows = []
    print(f"\n[decode] tok/s over {DECODE_STEPS} decode steps, {DTYPE}")
    print(f"{'prefix':>7}{'batch':>6}{'hydragen':>10}{'no hydra':>10}{'transformers':>13}{'hyd/off':>9}{'hyd/hf':>8}")
    for prefix_len in prefixes:
        prefix = text_ids(tok, prefix_len, seed=prefix_len)
        for b in batches:
            row = {"prefix": prefix_len, "batch": b}
            for name, llm in engines.items():
                row[name] = ridgeline_decode(llm, tok, prefix, b, repeats)
            row["transformers"] = transformers_decode(hf, tok, prefix, b, repeats)
            rows.append(row)
            print(f"{prefix_len:>7}{b:>6}{row['hydragen']:>10.1f}{row['no_hydragen']:>10.1f}"
                  f"{row['transformers']:>13.1f}{row['hydragen'] / row['no_hydragen']:>8.2f}x"
                  f"{row['hydragen'] / row['transformers']:>7.2f}x")
    for b in batches:  # the paper's claim: a 16x longer prefix costs Hydragen little at high batch
        by_prefix = {r["prefix"]: r for r in rows if r["batch"] == b}
        if min(prefixes) in by_prefix and max(prefixes) in by_prefix:
            lo, hi = by_prefix[min(prefixes)], by_prefix[max(prefixes)]
            drops = {k: 1 - hi[k] / lo[k] for k in ("hydragen", "no_hydragen", "transformers")}
            print(f"batch {b}: prefix {min(prefixes)} -> {max(prefixes)} throughput drop: "
                  + ", ".join(f"{k} {v:.0%}" for k, v in drops.items()))
    return rows


# ---------------------------------------------------------------- ttft

def section_ttft(repeats: int) -> dict:
    llm = LLM(dtype=DTYPE, max_model_len=4096, kv_cache_memory="1GiB")
    tok = llm.get_tokenizer()
    one = SamplingParams(temperature=0, max_tokens=1)
    cold, warm = [], []
    for r in range(repeats):
        prefix = text_ids(tok, 2000, seed=50 + r)  # a prefix never seen before
        a = {"prompt_token_ids": prefix + text_ids(tok, 16, seed=70 + r)}
        b = {"prompt_token_ids": prefix + text_ids(tok, 16, seed=90 + r)}
        t = time.perf_counter()
        llm.generate([a], one, use_tqdm=False)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        llm.generate([b], one, use_tqdm=False)  # same prefix, now cached
        warm.append(time.perf_counter() - t)
    res = {"uncached_ms": statistics.median(cold) * 1e3, "cached_ms": statistics.median(warm) * 1e3}
    print(f"\n[ttft] 2,000-token prefix + 16-token suffix: uncached {res['uncached_ms']:.0f} ms, "
          f"cached {res['cached_ms']:.0f} ms ({res['uncached_ms'] / res['cached_ms']:.1f}x)")
    return res


# ---------------------------------------------------------------- batch

def section_batch(repeats: int) -> dict:
    # ~150 blocks of 16 tokens: room for about 4 of the 8 prefixes plus running requests
    llm = LLM(dtype=DTYPE, max_model_len=2048, kv_cache_memory="56MiB", max_num_seqs=64)
    tok = llm.get_tokenizer()
    rng = random.Random(0)
    prefixes = [text_ids(tok, 512, seed=300 + p) for p in range(8)]
    prompts, params = [], []
    for i in range(256):
        prompts.append({"prompt_token_ids": prefixes[i % 8] + text_ids(tok, rng.randint(8, 32), seed=400 + i)})
        params.append(SamplingParams(temperature=0, max_tokens=rng.randint(16, 48), ignore_eos=True))
    order = list(range(256))
    rng.shuffle(order)  # arrival order: prefixes interleaved
    prompts, params = [prompts[i] for i in order], [params[i] for i in order]
    out_tokens = sum(p.max_tokens for p in params)
    res = {}
    for name, aware in (("fcfs", False), ("prefix_aware", True)):
        t = median_time(lambda: llm.generate(prompts, params, use_tqdm=False, prefix_aware=aware), repeats)
        res[name] = {"seconds": t, "output_tok_s": out_tokens / t}
    print(f"\n[batch] 256 requests, 8 prefixes of 512 tokens, {out_tokens} output tokens: "
          f"FCFS {res['fcfs']['output_tok_s']:.0f} tok/s, prefix-aware {res['prefix_aware']['output_tok_s']:.0f} tok/s "
          f"({res['prefix_aware']['output_tok_s'] / res['fcfs']['output_tok_s']:.2f}x)")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", nargs="+", default=["threshold", "decode", "ttft", "batch"],
                    choices=["threshold", "decode", "ttft", "batch"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--prefixes", type=int, nargs="+", default=list(PREFIXES))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    results = {"dtype": DTYPE, "threads": torch.get_num_threads(), "repeats": args.repeats}
    if "threshold" in args.section:
        results["threshold"] = section_threshold(args.repeats)
    if "decode" in args.section:
        results["decode"] = section_decode(args.repeats, tuple(args.batches), tuple(args.prefixes))
    if "ttft" in args.section:
        results["ttft"] = section_ttft(args.repeats)
    if "batch" in args.section:
        results["batch"] = section_batch(args.repeats)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
