"""LLMEngine: wires the parts together and runs one step at a time.

add_request() validates (InputProcessor) and queues; one step is
`out = scheduler.schedule()` -> `result = runner.execute(out)` ->
`scheduler.update_from_output(out, result)` -> the output processor (text, stop strings,
RequestOutputs of the requests that changed). The scheduler and block manager (core/) are
plain Python; only the ModelRunner holds tensors.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time

import torch

from .config import ModelConfig
from .core.config import EngineConfig
from .core.kv_blocks import BlockManager
from .core.request import Request
from .core.scheduler import Scheduler
from .core.stats import EngineStats
from .cpu_memory import reuse_freed_memory
from .input_processor import InputProcessor
from .kernels import native_bf16
from .kv_cache import KVCachePool
from .loader import load_checkpoint
from .model import Transformer
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .core.spec_policy import SpecPolicy
from .spec_decode.draft import DraftModel
from .spec_decode.ngram import NgramProposer
from .structured.masks import GrammarMasks
from .tokenizer import load_tokenizer

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
            model = Transformer(ckpt.config, ckpt.weights, self.dtype, self.device, config.cpu_kernels,
                                config.quant_activation_bytes)
            del ckpt

        mc = self.model_config
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        if self.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len ({self.max_model_len}) exceeds the model's context length "
                             f"({mc.max_position_embeddings})")
        cache = config.cache
        bs = cache.block_size
        block_bytes = KVCachePool.bytes_per_block(mc, bs, self.dtype)
        num_blocks = cache.num_blocks(block_bytes)
        if num_blocks * bs < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * bs} tokens ({num_blocks} blocks of {bs}), fewer than "
                f"max_model_len={self.max_model_len}; raise kv_cache_memory or lower max_model_len")
        self.block_size, self.num_kv_blocks = bs, num_blocks
        with _out_of_memory(f"allocating the KV cache ({num_blocks} blocks, {num_blocks * block_bytes / 2**30:.2f} GiB)",
                            "lower kv_cache_memory (--kv-cache-memory) or max_model_len (--max-model-len)"):
            kv = KVCachePool(mc, num_blocks, bs, self.dtype, self.device)
        eos_ids = list(mc.eos_token_ids)
        if not eos_ids and self.tokenizer.eos_token_id is not None:
            eos_ids = [self.tokenizer.eos_token_id]
        if mc.is_gemma:  # instruction-tuned Gemma ends a turn with <end_of_turn> (as llama.cpp's EOG list)
            eot = self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
            if (isinstance(eot, int) and 0 <= eot < mc.vocab_size and eot not in eos_ids
                    and self.tokenizer.convert_ids_to_tokens(eot) == "<end_of_turn>"):  # (not the unknown token)
                eos_ids.append(eot)
        self.eos_token_ids = eos_ids
        self._blocks = BlockManager(num_blocks, bs, cache.enable_prefix_caching)
        # Hydragen's grouping is skipped for sliding-window models (a window cuts the shared prefix);
        # hybrid ones (Gemma 3) use it on their full-attention layers only (the windowed layers'
        # metadata has no shared parts), except with soft-capped scores (Gemma 2: no LSE kernel)
        hydragen = (config.hydragen.resolve(model.attention_kernels)
                    if mc.uniform_window is None and mc.attn_logit_softcap is None else None)
        self.hydragen = hydragen  # the shared-prefix policy in force (None: off)
        proposer, policy, lookahead = self._speculation(num_blocks)
        self.spec_policy = policy
        self._scheduler = Scheduler(config.scheduler, self._blocks, self.max_model_len, eos_ids, hydragen,
                                    policy, lookahead)
        self.runner = ModelRunner(model, kv, self.device, mc.uniform_window, eos_ids, proposer,
                                  local_window=mc.sliding_window if mc.hybrid_attention else None)
        self.runner.grammar = GrammarMasks(self.tokenizer, mc.vocab_size, eos_ids)
        self.inputs = InputProcessor(self.tokenizer, mc.vocab_size, self.max_model_len,
                                     config.scheduler.max_num_seqs)
        self.outputs = OutputProcessor(self.tokenizer)
        self._requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._seed_rng = torch.Generator().manual_seed(config.seed)

    def _observe_step(self, out, seconds: float) -> None:
        """A decode step's measured time, for the speculation policy's correction (steps with
        prefill chunks are not decode steps and are left out)."""
        if not out.seqs or any(not s.sample or (s.num_new_tokens > 1 and not s.spec_token_ids) for s in out.seqs):
            return
        batch = len(out.seqs)
        context = sum(s.start for s in out.seqs) // batch
        self.spec_policy.observe_step(batch, context, out.num_tokens / batch, out.num_spec_tokens, seconds)

    def _speculation(self, num_blocks: int):
        """(proposer, policy, lookahead tokens) for the configured speculative decoding, or Nones."""
        spec = self.config.speculative
        if spec.method is None:
            return None, None, 0
        if spec.method == "ngram":
            proposer, lookahead = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max), 0
        else:
            with _out_of_memory("loading the draft model", "use a smaller draft model or lower kv_cache_memory"):
                proposer = DraftModel(spec.model, self.dtype, self.device, num_blocks, self.block_size, self.tokenizer,
                                      self.model_config.vocab_size, self.config.cpu_kernels,
                                      self.config.quant_activation_bytes)
            lookahead = spec.num_speculative_tokens
        step_time = draft_cost = None
        if spec.adaptive:
            step_time, draft_cost = self._spec_costs(proposer)
        return proposer, SpecPolicy(spec.num_speculative_tokens, step_time, draft_cost or 0.0), lookahead

    def _spec_costs(self, proposer):
        """The target's step time from the performance model on this machine's probed spec (probed
        now, a few seconds, and saved, if there is none yet), and a draft model's time per token
        relative to the target's: their weight bytes as kept in memory."""
        from .loader import stored_weight_format
        from .perf import HardwareSpecError, PerfModel, load_spec, save_spec
        from .perf.hardware import local_spec_name
        from .perf.ops import weight_bytes
        from .perf.plan import spec_step_time
        from .perf.probe import probe

        try:
            hw = load_spec("local")
        except HardwareSpecError:
            log.info("speculative: probing this machine for the performance model (once, a few seconds)")
            hw = probe(local_spec_name(), self.device.type)
            save_spec(hw)
        dtype = str(self.dtype).removeprefix("torch.")

        def kept_format(path, quantization: str) -> str:
            if quantization not in ("auto", "none"):
                return quantization
            if quantization == "auto" and self.device.type == "cpu":
                return stored_weight_format(path) or dtype
            return dtype

        weights = kept_format(self.model_path, self.config.quantization)
        pm = PerfModel(self.model_config, hw, dtype, weights, block_size=self.block_size)
        draft_cost = 0.0
        if isinstance(proposer, DraftModel):  # the draft keeps its file's formats ("auto")
            draft_cost = (weight_bytes(proposer.config, kept_format(proposer.path, "auto"))
                          / weight_bytes(self.model_config, weights))
        return spec_step_time(pm), draft_cost

    @property
    def model(self) -> Transformer:
        return self.runner.model

    @property
    def enable_prefix_caching(self) -> bool:
        return self.config.cache.enable_prefix_caching

    # ------------------------------------------------------------------ requests

    def tokenize(self, prompt: str) -> list[int]:
        return self.inputs.tokenize(prompt)

    def add_request(self, prompt: str | list[int] | dict, params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Validate and queue a request; raises ValueError (naming the field) without side effects."""
        params = params or SamplingParams()
        processed = self.inputs.process(prompt, params)
        if params.structured_outputs is not None:  # compiled for this vocabulary (cached), or a ValueError
            self.runner.grammar.template(params.structured_outputs)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        base_seed = params.seed if params.seed is not None else int(
            torch.randint(0, 2**62, (1,), generator=self._seed_rng))
        req = Request.create(request_id, processed.token_ids, params, base_seed)
        self._requests[request_id] = req
        self.outputs.add_request(req, processed.text)
        self._scheduler.add_request(req)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its KV blocks; False if it was not unfinished here."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self._scheduler.abort_request(req)
        self.outputs.remove(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def request_ids(self) -> list[str]:
        """The unfinished requests, in arrival order."""
        return list(self._requests)

    @property
    def num_steps(self) -> int:
        """Steps that ran the model (get_stats() has it too, with everything else, at more cost)."""
        return self._scheduler.num_steps

    def get_stats(self) -> EngineStats:
        sched, alloc = self._scheduler, self._blocks.allocator
        running = len({id(s.request) for s in sched.running})
        return EngineStats(
            num_steps=sched.num_steps, num_preemptions=sched.num_preemptions,
            prompt_tokens=sched.num_prompt_tokens, generation_tokens=sched.num_generation_tokens,
            prefix_cache_queries=self._blocks.num_cache_queries, prefix_cache_hits=self._blocks.num_cache_hits,
            hydragen_steps=sched.num_hydragen_steps, spec_decode_num_drafts=sched.num_spec_drafts,
            spec_decode_num_draft_tokens=sched.num_spec_draft_tokens,
            spec_decode_num_accepted_tokens=sched.num_spec_accepted_tokens,
            num_requests=len(self._requests), num_requests_running=running,
            num_requests_waiting=len(self._requests) - running,
            num_seqs_running=sched.num_running, num_seqs_waiting=sched.num_waiting,
            kv_blocks_total=alloc.num_blocks, kv_blocks_used=alloc.num_used, kv_blocks_shared=alloc.num_shared)

    # ------------------------------------------------------------------ step

    def step(self) -> list[RequestOutput]:
        out = self._scheduler.schedule()
        t0 = time.perf_counter()
        result = self.runner.execute(out)
        if self.spec_policy is not None:
            self._observe_step(out, time.perf_counter() - t0)
        if not out.seqs:
            return []
        updates = self._scheduler.update_from_output(out, result)
        for hit in self.outputs.process(updates):
            if hit.num_dropped:  # a stop string inside a speculative step's tokens: cut there
                del hit.seq.token_ids[-hit.num_dropped:]
            self._scheduler.finish_seq(hit.seq, "stop", hit.stop_string)
        for u in updates:  # a grammar that allows no token: ended here, with no token sampled
            err = result.grammar_errors.get(u.seq.seq_id)
            if err is not None and not u.seq.finished:
                self._scheduler.finish_seq(u.seq, "grammar_error", err)
        touched = list({id(u.seq.request): u.seq.request for u in updates}.values())
        for req in touched:
            if req.finished:
                self._requests.pop(req.request_id, None)
        return self.outputs.make_outputs(touched)
