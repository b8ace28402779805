"""The offline Python API, shaped like vLLM's `LLM` so its users feel at home."""

from __future__ import annotations

from collections.abc import Iterator, Sequence as Seq
from typing import Any

from tqdm import tqdm

from .core.batch_order import BatchItem, prefix_aware_order
from .core.config import EngineConfig
from .engine import LLMEngine
from .core.stats import EngineStats
from .outputs import RequestOutput
from .sampling_params import SamplingParams

PromptType = str | list[int] | dict


class LLM:
    """Load a model and generate from it.

    LLM() loads the default model (SmolLM2-135M-Instruct, Q4_1 GGUF). `model` may be a .gguf
    file or a Hugging Face checkpoint directory. Keyword arguments are EngineConfig's flat names
    (EngineConfig.from_kwargs): dtype ('auto', 'float32', 'bfloat16'), max_model_len,
    kv_cache_memory ('2GiB'), block_size, max_num_seqs, max_num_batched_tokens, seed,
    num_kv_blocks, device, enable_prefix_caching, ...; or config=EngineConfig(...) whole.
    """

    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **kwargs: Any):
        if config is not None:
            if kwargs or model is not None:
                raise TypeError("LLM(config=...) takes no other options; set them in the EngineConfig")
        else:
            try:
                config = EngineConfig.from_kwargs(model=model, **kwargs)
            except TypeError as exc:
                raise TypeError(f"LLM() got {exc}") from None
        self.engine = LLMEngine(config)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, prefix_aware: bool = True) -> list[RequestOutput]:
        """Generate for each prompt; outputs come back in input order.

        With prefix_aware (and prefix caching on), prompts sharing a prefix are submitted
        together, larger decode shares first (BatchLLM's ordering; see batch_order.py)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        return self._run(prompts, params, use_tqdm, prefix_aware)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or a batch of them."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.render_chat(c, add_generation_prompt) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> dict:
        """Apply the model's chat template; returns a token-id prompt with the rendered text."""
        return self.engine.inputs.chat_prompt(messages, add_generation_prompt)

    def get_stats(self) -> EngineStats:
        """The engine's counters and gauges (steps, tokens, preemptions, prefix-cache hits, KV blocks)."""
        return self.engine.get_stats()

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text pieces of a single-sample request as they are generated."""
        engine = self.engine
        rid = engine.add_request(prompt, sampling_params)
        sent = 0
        try:
            while True:
                for out in engine.step():
                    if out.request_id != rid:
                        continue
                    text = out.outputs[0].text
                    if len(text) > sent:
                        yield text[sent:]
                        sent = len(text)
                    if out.finished:
                        return
        finally:
            engine.abort_request(rid)

    def _run(self, prompts: list[PromptType], params: list[SamplingParams], use_tqdm: bool,
             prefix_aware: bool) -> list[RequestOutput]:
        engine = self.engine
        parsed = [engine.inputs.prompt(p) for p in prompts]  # a bad prompt rejects the whole call up front
        order = list(range(len(prompts)))
        if prefix_aware and engine.enable_prefix_caching and len(prompts) > 1:
            items = [BatchItem(p.token_ids, sp.max_tokens or engine.max_model_len - len(p.token_ids))
                     for p, sp in zip(parsed, params)]
            order = prefix_aware_order(items, engine.block_size)
        ids: list[str | None] = [None] * len(prompts)
        try:
            for i in order:
                ids[i] = engine.add_request({"prompt": parsed[i].text, "prompt_token_ids": parsed[i].token_ids},
                                            params[i])
        except Exception:
            for rid in ids:  # leave nothing queued
                if rid is not None:
                    engine.abort_request(rid)
            raise
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Generating", disable=not use_tqdm, dynamic_ncols=True)
        try:
            while len(results) < len(ids):
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        finally:
            bar.close()
            for rid in ids:
                if rid not in results:
                    engine.abort_request(rid)
        return [results[rid] for rid in ids]

