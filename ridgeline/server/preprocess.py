"""Prompt preparation off the engine thread: chat template, tokenization and every length check,
by the engine's InputProcessor rules plus the server's own (OpenAI-style length errors, the KV
pool's capacity, bounded work on huge texts), as HTTP 400s.

Tokenizing a long prompt takes a while (0.4 s for 630k characters here, about the longest string
the default model's 8k context could ever hold); done in the engine thread, as before, that is a
pause of the same length in every stream in flight. The fast tokenizer releases the GIL while it
encodes, so a worker thread does it while the step loop keeps stepping, and the engine thread only
adds token ids. One worker, so at most one core goes to preprocessing; on Linux it runs at a lower
CPU priority, so that on a machine with few cores the step loop wins the CPU over a client's
preprocessing (the GIL-free encode is most of its time, so the engine never waits on it). A
text far longer than the context first has a prefix tokenized (PROBE_CHARS_PER_TOKEN), so a
megabyte prompt is refused after a few tens of kilobytes of work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..engine import LLMEngine
from ..input_processor import InputProcessor
from ..sampling_params import SamplingParams
from .protocol import APIError

log = logging.getLogger("ridgeline.server")
WORKER_NICE = 10  # added to the worker thread's nice value (Linux: per thread)
# A text longer than PROBE_CHARS_PER_TOKEN characters per context token is first tokenized in a
# prefix of that length: if the prefix alone is over the context (by more than PROBE_SLACK: a cut
# word may tokenize differently), the prompt is refused without tokenizing the rest. Ordinary
# text is ~4 characters a token, so a megabyte-long prompt costs a few tens of kilobytes of work.
PROBE_CHARS_PER_TOKEN = 8
PROBE_SLACK = 64


@dataclass
class PreparedPrompt:
    """A prompt ready for the engine: its text, token ids and decoded first token (echo + logprobs)."""

    text: str
    token_ids: list[int]
    first_token: str


@dataclass(frozen=True)
class PromptRules:
    """What preparing a prompt needs from the engine, read once: the tokenizer is used from the
    worker thread while the engine decodes with it, which its Rust core allows (both only read)."""

    inputs: InputProcessor  # the engine's own (same ids and checks as LLM.generate)
    block_size: int
    num_blocks: int
    max_chars: int  # characters of text that could still fit the context (limits.BodyLimits.max_string_chars)

    @classmethod
    def from_engine(cls, engine: LLMEngine, max_chars: int) -> "PromptRules":
        return cls(engine.inputs, engine.block_size, engine.num_kv_blocks, max_chars)

    @property
    def max_model_len(self) -> int:
        return self.inputs.max_model_len


class Preprocessor:
    """Runs `prepare` in one worker thread; the awaiting handler's event loop stays free."""

    def __init__(self, rules: PromptRules):
        self.rules = rules
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ridgeline-preprocess",
                                        initializer=_lower_priority)

    async def prepare(self, prompts: Sequence[Any], params: SamplingParams, param: str) -> list[PreparedPrompt]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, prepare, self.rules, prompts, params, param)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in the worker thread: other tokenizer work (/tokenize, /detokenize) stays off
        the engine thread and the event loop too."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def prepare(rules: PromptRules, prompts: Sequence[Any], params: SamplingParams, param: str) -> list[PreparedPrompt]:
    """Each prompt (a string, token ids, or a chat's (messages, add_generation_prompt)) prepared, or
    the APIError of the first that cannot run."""
    return [prepare_one(rules, p, params, param) for p in prompts]


def prepare_one(rules: PromptRules, prompt: Any, params: SamplingParams, param: str) -> PreparedPrompt:
    inputs = rules.inputs
    tok = inputs.tokenizer
    if isinstance(prompt, tuple):
        text = _render_chat(rules, *prompt)
        ids = _encode_bounded(rules, lambda t: tok.encode(t, add_special_tokens=False), text, param)
    elif isinstance(prompt, str):
        text, ids = prompt, _encode_bounded(rules, inputs.tokenize, prompt, param)
    else:
        try:
            ids = inputs.prompt(list(prompt)).token_ids
        except ValueError as exc:
            raise APIError(400, f"prompt: {exc}", param="prompt") from None
        text = tok.decode(ids)
    _check_lengths(rules, len(ids), params, param)
    inputs.check(len(ids), params)  # ValueErrors name their field; the handler makes them 400s
    return PreparedPrompt(text=text, token_ids=ids, first_token=tok.decode(ids[:1]))


def _encode_bounded(rules: PromptRules, encode: Callable[[str], list[int]], text: str, param: str,
                    probe_only: bool = False) -> list[int] | None:
    """encode(text), unless a prefix shows it cannot fit the context (then the length error);
    probe_only: only that check."""
    probe = PROBE_CHARS_PER_TOKEN * rules.max_model_len
    if len(text) > probe:
        head = len(encode(text[:probe]))
        if head > rules.max_model_len + PROBE_SLACK:
            raise _too_long(rules, head - PROBE_SLACK, param, at_least=True)
    return None if probe_only else encode(text)


def _render_chat(rules: PromptRules, messages: list[dict], add_generation_prompt: bool,
                 tools: list[dict] | None = None) -> str:
    """The conversation through the model's chat template, refused first if its text alone is longer
    than any context could hold (each string is bounded by limits.py; their sum is bounded here),
    or if the probe shows its contents alone overflow the context: rendering runs in Python under
    the GIL (about 0.1 s for 600k characters), a pause in every stream, where the probe's
    tokenization releases it."""
    if not rules.inputs.tokenizer.chat_template:
        raise APIError(400, "messages: this model has no chat template; use /v1/completions", param="messages")
    chars = sum(len(m["content"]) for m in messages)
    if chars > rules.max_chars:
        raise APIError(400, f"messages: the conversation holds {chars} characters (at most {rules.max_chars}; "
                            "longer text cannot fit the context)", param="messages")
    if chars > PROBE_CHARS_PER_TOKEN * rules.max_model_len:
        tok = rules.inputs.tokenizer
        _encode_bounded(rules, lambda t: tok.encode(t, add_special_tokens=False),
                        "\n".join(m["content"] for m in messages), "messages", probe_only=True)
    try:
        return rules.inputs.render_chat(messages, add_generation_prompt, tools)
    except ValueError as exc:
        raise APIError(400, f"messages: {exc}", param="messages") from None
    except Exception as exc:  # jinja raises on conversations the template refuses
        raise APIError(400, f"messages: the chat template rejected the conversation: {exc}",
                       param="messages") from None


def _too_long(rules: PromptRules, num_prompt: int, param: str, at_least: bool = False) -> APIError:
    limit = rules.max_model_len
    has = ("have" if param == "messages" else "has") + (" at least" if at_least else "")
    return APIError(400, f"{param}: this model's maximum context length is {limit} tokens, but the {param} "
                         f"{has} {num_prompt} tokens (at most {limit - 1} leave room for output)", param=param)


def _check_lengths(rules: PromptRules, num_prompt: int, params: SamplingParams, param: str) -> None:
    limit = rules.max_model_len
    if num_prompt >= limit:
        raise _too_long(rules, num_prompt, param)
    if params.max_tokens is not None and num_prompt + params.max_tokens > limit:
        raise APIError(400, f"max_tokens: this model's maximum context length is {limit} tokens; the request "
                            f"asks for {num_prompt + params.max_tokens} ({num_prompt} in the {param}, "
                            f"{params.max_tokens} in the completion)", param="max_tokens")
    # Each sample needs KV blocks for its whole sequence at once (samples of one request can take
    # turns, through preemption, so only one sequence must fit). The engine sizes its pool to at
    # least the context length, which makes this a guard against a queue that would never move.
    max_new = params.max_tokens if params.max_tokens is not None else limit - num_prompt
    bs, pool = rules.block_size, rules.num_blocks
    need = -(-(num_prompt + max_new) // bs)
    if need > pool:
        raise APIError(400, f"max_tokens: {num_prompt} prompt + {max_new} completion tokens need {need} KV-cache "
                            f"blocks, but the pool holds {pool} ({pool * bs} tokens)", param="max_tokens")


def _lower_priority() -> None:
    if sys.platform.startswith("linux"):  # elsewhere PRIO_PROCESS with a thread id is not per thread
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + WORKER_NICE)
        except OSError as exc:
            log.debug("preprocess worker keeps its priority: %s", exc)
