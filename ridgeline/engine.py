"""LLMEngine: owns the model, KV pool, scheduler and requests; `step()` runs one batch.

add_request() validates and queues; step() schedules a token budget, runs the model once
over the flat batch, samples for every sequence that caught up with its tokens, updates
text / stop conditions, and returns the outputs of requests that changed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from dataclasses import dataclass

import torch

from .attention import build_metadata
from .config import QUANTIZATION_MODES, ModelConfig
from .cpu_memory import reuse_freed_memory
from .kernels import native_bf16
from .hydragen import MIN_SAVED_TOKENS_CPU_KERNELS, MIN_SAVED_TOKENS_TORCH, HydragenConfig
from .kv_cache import BlockManager, CacheConfig, KVCachePool, parse_memory_size
from .loader import load_checkpoint
from .model import Transformer
from .outputs import Logprob, RequestOutput
from .sampler import sample
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerConfig
from .sequence import Request, Sequence, SeqStatus
from .tokenizer import IncrementalDetokenizer, load_tokenizer

log = logging.getLogger("ridgeline")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 where the hardware computes it natively (half the bytes per decoded
    token, and decode is memory-bound), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" or native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    if DTYPES[dtype] == torch.float16 and device.type == "cpu":
        raise ValueError("dtype float16 is not supported on CPU; use bfloat16 or float32")
    return DTYPES[dtype]


@dataclass
class EngineConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    kv_cache_memory: int | str = "2GiB"
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests use tiny pools)
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    seed: int = 0
    num_threads: int | None = None
    enable_prefix_caching: bool = True
    enable_hydragen: bool = True  # shared-prefix decode attention (exact; see hydragen.py)
    # use a shared prefix of P tokens among g rows if (g-1)*P >= this; None: the measured
    # break-even for the decode attention in use (hydragen.MIN_SAVED_TOKENS_*: 3072 with the
    # fused CPU kernels, else 512)
    hydragen_min_saved_tokens: int | None = None
    # "auto": a GGUF's block-quantized matrices stay in their formats (CPU; dequantized on GPU);
    # "none": dequantize them to `dtype` (the reference path); "q8_0" / "q4_0" / "q4_k": also
    # quantize dense matrices (Hugging Face checkpoints) to that format at load.
    quantization: str = "auto"
    # bytes per activation value in the block-quantized matmuls (kernels/quant_kernels.c): 1 = 8
    # bits, llama.cpp's numerics; 2 = about 15 bits (greedy outputs follow the float32 reference)
    # at twice the integer work per weight (decode and prefill ~1.7-2x slower on a 1B Q4_K_M)
    quant_activation_bytes: int = 1
    # fused C kernels for the per-layer elementwise work on CPU (ridgeline/kernels; compiled at
    # first use, skipped without a C compiler). False: PyTorch ops only.
    cpu_kernels: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {self.block_size!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.hydragen_min_saved_tokens is not None and self.hydragen_min_saved_tokens < 1:
            raise ValueError(f"hydragen_min_saved_tokens must be >= 1, got {self.hydragen_min_saved_tokens}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, "
                             f"got {self.quantization!r}")
        if self.quant_activation_bytes not in (1, 2):
            raise ValueError(f"quant_activation_bytes must be 1 or 2, got {self.quant_activation_bytes!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


class OutOfMemory(MemoryError):
    """Memory ran out while building the engine; the message says what was being allocated and
    what to change."""


@contextlib.contextmanager
def _out_of_memory(what: str, advice: str):
    try:
        yield
    except OutOfMemory:
        raise
    except (MemoryError, RuntimeError) as exc:  # torch's allocators raise RuntimeError
        if isinstance(exc, RuntimeError) and "alloc" not in str(exc).lower() and "out of memory" not in str(exc).lower():
            raise
        raise OutOfMemory(f"out of memory while {what}: {advice}") from exc


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cpu":
            reuse_freed_memory()

        with _out_of_memory("loading the model's weights",
                            f"use a smaller quantization (a Q4_K_M file, or --quantization q4_k for a "
                            f"Hugging Face checkpoint; now {config.quantization!r}) or a smaller model"):
            ckpt = load_checkpoint(config.model, self.dtype, config.quantization)
            self.model_path = ckpt.path
            self.model_config: ModelConfig = ckpt.config
            self.tokenizer = load_tokenizer(ckpt.path, ckpt.gguf_metadata)
            self.model = Transformer(ckpt.config, ckpt.weights, self.dtype, self.device, config.cpu_kernels,
                                     config.quant_activation_bytes)
            del ckpt

        mc = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's context length "
                             f"({mc.max_position_embeddings})")
        bs = config.block_size
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            num_blocks = parse_memory_size(config.kv_cache_memory) // CacheConfig.bytes_per_block(mc, bs, self.dtype)
        if num_blocks * bs < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * bs} tokens ({num_blocks} blocks of {bs}), fewer than "
                f"max_model_len={self.max_model_len}; raise kv_cache_memory or lower max_model_len")
        self.cache_config = CacheConfig(block_size=bs, num_blocks=num_blocks)
        kv_gib = num_blocks * CacheConfig.bytes_per_block(mc, bs, self.dtype) / 2**30
        with _out_of_memory(f"allocating the KV cache ({num_blocks} blocks, {kv_gib:.2f} GiB)",
                            "lower kv_cache_memory (--kv-cache-memory) or max_model_len (--max-model-len)"):
            self.kv = KVCachePool(mc, num_blocks, bs, self.dtype, self.device)
        self.block_manager = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        min_saved = config.hydragen_min_saved_tokens
        if min_saved is None:
            min_saved = MIN_SAVED_TOKENS_CPU_KERNELS if self.model.attention_kernels else MIN_SAVED_TOKENS_TORCH
        self.hydragen = HydragenConfig(min_saved) if config.enable_hydragen else None
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens), self.block_manager)
        self.eos_ids = list(mc.eos_token_ids)
        if not self.eos_ids and self.tokenizer.eos_token_id is not None:
            self.eos_ids = [self.tokenizer.eos_token_id]
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(config.seed)
        self.stats = {"num_preemptions": 0, "prompt_tokens": 0, "generation_tokens": 0, "steps": 0,
                      "prefix_cache_queries": 0, "prefix_cache_hits": 0, "prefix_cache_hit_rate": 0.0,
                      "kv_blocks_shared": 0, "hydragen_steps": 0}

    # ------------------------------------------------------------------ requests

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def add_request(self, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue a request; raises ValueError (naming the field) without side effects."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self.prompt_ids(prompt)
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be < vocab size {vocab}")
        if params.n > self.scheduler.config.max_num_seqs:
            raise ValueError(f"n must be <= max_num_seqs ({self.scheduler.config.max_num_seqs}), got {params.n}")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens, but max_model_len is {self.max_model_len}: "
                f"the prompt must be at most {self.max_model_len - 1} tokens to leave room for output")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        req = Request(request_id=request_id, prompt=text, prompt_token_ids=ids, params=params)
        if params.prompt_logprobs is not None:
            req.prompt_logprobs = [None]
        base_seed = params.seed if params.seed is not None else int(
            torch.randint(0, 2**62, (1,), generator=self._seed_rng))
        for i in range(params.n):
            gen = torch.Generator(device=self.device).manual_seed(base_seed + i * 1_000_003)
            seq = Sequence(request=req, index=i, token_ids=list(ids), num_prompt_tokens=len(ids),
                           detokenizer=IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
                           generator=gen, logprobs=[] if params.logprobs is not None else None)
            req.seqs.append(seq)
        self.requests[request_id] = req
        # Samples 1..n-1 fork from sample 0 once the prompt is computed, sharing its KV blocks.
        req.unforked = req.seqs[1:]
        self.scheduler.add(req.seqs[0])
        return request_id

    def prompt_ids(self, prompt) -> tuple[str | None, list[int]]:
        """Validate a prompt and return (text or None, token ids). A dict with both 'prompt' and
        'prompt_token_ids' keeps the text for the output and runs the ids."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text = prompt.get("prompt")
                _, ids = self.prompt_ids(prompt["prompt_token_ids"])
                return (text if isinstance(text, str) else None), ids
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must be a non-empty string")
            return prompt, self.tokenize(prompt)
        if isinstance(prompt, (list, tuple)):
            vocab = self.model_config.vocab_size
            if not prompt:
                raise ValueError("prompt_token_ids must be a non-empty list")
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt_token_ids must be integers in [0, {vocab - 1}]")
            return None, list(prompt)
        raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        for seq in req.seqs:
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ------------------------------------------------------------------ step

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        self.stats["num_preemptions"] = self.scheduler.num_preemptions
        bm = self.block_manager
        self.stats["prefix_cache_queries"] = bm.num_cache_queries
        self.stats["prefix_cache_hits"] = bm.num_cache_hits
        self.stats["prefix_cache_hit_rate"] = bm.num_cache_hits / max(1, bm.num_cache_queries)
        self.stats["kv_blocks_shared"] = bm.allocator.num_shared
        if not batch.seqs:
            return []
        self.stats["steps"] += 1
        # Decode rows (one new token) first: the attention metadata groups them.
        order = sorted(range(len(batch)), key=lambda i: batch.num_new_tokens[i] != 1)
        seqs = [batch.seqs[i] for i in order]
        lens = [batch.num_new_tokens[i] for i in order]
        starts = [s.num_computed_tokens for s in seqs]

        input_ids, positions = [], []
        logit_rows, sample_seqs, prompt_lp = [], [], []  # prompt_lp: (seq, first row, count)
        row = 0
        for seq, start, n in zip(seqs, starts, lens):
            input_ids.extend(seq.token_ids[start:start + n])
            positions.extend(range(start, start + n))
            req = seq.request
            if req.prompt_logprobs is not None and seq.index == 0:
                done = len(req.prompt_logprobs)  # entries for positions < done exist
                first, last = max(start, done - 1), min(start + n, seq.num_prompt_tokens - 1)
                if last > first:
                    prompt_lp.append((seq, len(logit_rows), last - first))
                    logit_rows.extend(range(row + first - start, row + last - start))
            if start + n == seq.num_tokens:
                sample_seqs.append((seq, len(logit_rows)))
                logit_rows.append(row + n - 1)
            row += n

        meta = build_metadata([s.block_table for s in seqs], starts, lens, self.cache_config.block_size,
                              self.model_config.sliding_window, self.device, self.hydragen, self.model.dtype)
        if meta.decode is not None and meta.decode.prefix_parts:
            self.stats["hydragen_steps"] += 1
        dev = self.device
        logits = self.model.forward(
            torch.tensor(input_ids, device=dev), torch.tensor(positions, device=dev), meta, self.kv,
            torch.tensor(logit_rows, dtype=torch.long, device=dev))

        for seq, n in zip(seqs, lens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens <= seq.num_prompt_tokens:
                self.stats["prompt_tokens"] += n
            seq.num_cached_blocks = bm.cache_full_blocks(seq.token_ids, seq.block_hashes, seq.block_table,
                                                         seq.num_computed_tokens, seq.num_cached_blocks)
        for seq, row in list(sample_seqs):
            if seq.request.unforked:
                sample_seqs.extend((child, row) for child in self._fork(seq))
        for seq, first, count in prompt_lp:
            self._record_prompt_logprobs(seq, logits[first:first + count])

        touched: dict[str, Request] = {}
        if sample_seqs:
            rows = torch.tensor([r for _, r in sample_seqs], device=dev)
            out = sample(logits[rows], [s for s, _ in sample_seqs], self.eos_ids)
            now = time.monotonic()
            for (seq, _), tok, lp in zip(sample_seqs, out.token_ids, out.logprobs):
                self._append_token(seq, tok, lp)
                req = seq.request
                if req.first_token_time is None:
                    req.first_token_time = now
                touched[req.request_id] = req
        for seq in seqs:
            if seq.request.prompt_logprobs is not None:
                touched[seq.request.request_id] = seq.request

        outputs = []
        for req in touched.values():
            if req.finished:
                req.finish_time = time.monotonic()
                self.requests.pop(req.request_id, None)
            outputs.append(req.to_output())
        return outputs

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """Start the request's other samples from the parent's computed prompt: full blocks shared,
        the partly filled last block copied. A sample that finds no free block for its copy queues
        as an ordinary sequence (it will still reuse the cached full blocks)."""
        req = parent.request
        forked = []
        for child in req.unforked:
            table = self.block_manager.fork(parent.block_table, parent.num_computed_tokens, self.kv)
            if table is None:
                self.scheduler.waiting.appendleft(child)
                continue
            child.block_table = table
            child.num_computed_tokens = parent.num_computed_tokens
            child.status = SeqStatus.RUNNING
            self.scheduler.running.append(child)
            forked.append(child)
        req.unforked = []
        return forked

    def _record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor) -> None:
        req = seq.request
        k = req.params.prompt_logprobs
        lp = torch.log_softmax(logits, dim=-1)
        pos0 = len(req.prompt_logprobs)
        targets = torch.tensor(seq.token_ids[pos0:pos0 + lp.shape[0]])
        chosen = lp.gather(1, targets.unsqueeze(1).to(lp.device)).squeeze(1)
        ranks = (lp > chosen.unsqueeze(1)).sum(-1) + 1
        top_vals, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
        for j, tok in enumerate(targets.tolist()):
            entry = {tok: Logprob(chosen[j].item(), int(ranks[j]), self._decode_one(tok))}
            for r, (tid, val) in enumerate(zip(top_ids[j].tolist(), top_vals[j].tolist())):
                entry.setdefault(tid, Logprob(val, r + 1, self._decode_one(tid)))
            req.prompt_logprobs.append(entry)

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _append_token(self, seq: Sequence, token: int, lp) -> None:
        params = seq.request.params
        seq.token_ids.append(token)
        self.stats["generation_tokens"] += 1
        if lp is not None:
            chosen_lp, rank, top_ids, top_vals = lp
            seq.cumulative_logprob += chosen_lp
            entry = {token: Logprob(chosen_lp, rank, self._decode_one(token))}
            for r, (tid, val) in enumerate(zip(top_ids, top_vals)):
                entry.setdefault(tid, Logprob(val, r + 1, self._decode_one(tid)))
            seq.logprobs.append(entry)

        piece = seq.detokenizer.step(token)
        old_len = len(seq.text)
        seq.text += piece
        n_out = seq.num_output_tokens
        reason, stop_reason = None, None
        if params.stop_strings and piece:
            # Only a window that includes the new piece can contain a new match.
            window_start = max(0, old_len - max(len(s) for s in params.stop_strings) + 1)
            hits = [(seq.text.find(s, window_start), s) for s in params.stop_strings]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                idx, s = min(hits)
                seq.text = seq.text[:idx + len(s)] if params.include_stop_str_in_output else seq.text[:idx]
                reason, stop_reason = "stop", s
        if reason is None and n_out >= params.min_tokens:
            if token in params.stop_token_ids:
                reason, stop_reason = "stop", token
            elif not params.ignore_eos and token in self.eos_ids:
                reason = "stop"
        if reason is None and ((params.max_tokens is not None and n_out >= params.max_tokens)
                               or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            seq.finish_reason, seq.stop_reason = reason, stop_reason
            self.scheduler.finish(seq)
