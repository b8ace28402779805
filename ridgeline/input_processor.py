"""InputProcessor: turns what a user submits into token ids the engine can run, or a ValueError
naming the field. One set of rules for LLM, the CLI, the engine and the server (whose
preprocess.py runs them in its worker thread and maps the errors to HTTP 400s)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .sampling_params import SamplingParams

CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class ProcessedPrompt:
    text: str | None  # None for a token-id prompt given without its text
    token_ids: list[int]


def validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int, max_num_seqs: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs

    def tokenize(self, text: str) -> list[int]:
        """A plain prompt's ids: the tokenizer adds its special tokens (BOS) as in transformers."""
        return self.tokenizer.encode(text, add_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        """The conversation through the model's chat template (with `tools` for templates that
        render them; server/tools.py decides)."""
        validate_messages(messages)
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template; use a plain prompt")
        extra = {"tools": tools} if tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **extra)

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> dict:
        """A token-id prompt with the rendered text. The template already holds the special
        tokens: no BOS is added again."""
        text = self.render_chat(messages, add_generation_prompt)
        return {"prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False), "prompt": text}

    def prompt(self, prompt: Any) -> ProcessedPrompt:
        """Validate a prompt: a string, token ids, or a dict with 'prompt' and/or 'prompt_token_ids'
        (with both, the text is kept for the output and the ids are run)."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text = prompt.get("prompt")
                ids = self.prompt(prompt["prompt_token_ids"]).token_ids
                return ProcessedPrompt(text if isinstance(text, str) else None, ids)
            if "prompt" not in prompt:
                raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must be a non-empty string")
            return ProcessedPrompt(prompt, self.tokenize(prompt))
        if isinstance(prompt, (list, tuple)):
            vocab = self.vocab_size
            if not prompt:
                raise ValueError("prompt_token_ids must be a non-empty list")
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt_token_ids must be integers in [0, {vocab - 1}]")
            return ProcessedPrompt(None, list(prompt))
        raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def check(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """The request-level limits: stop token ids in the vocabulary, n within the running set,
        and room in the context for at least one output token."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if any(t >= self.vocab_size for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be < vocab size {self.vocab_size}")
        if params.n > self.max_num_seqs:
            raise ValueError(f"n must be <= max_num_seqs ({self.max_num_seqs}), got {params.n}")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt is {num_prompt_tokens} tokens, but max_model_len is {self.max_model_len}: "
                f"the prompt must be at most {self.max_model_len - 1} tokens to leave room for output")

    def process(self, prompt: Any, params: SamplingParams) -> ProcessedPrompt:
        """prompt() then check(): everything add_request needs, without side effects."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        processed = self.prompt(prompt)
        self.check(len(processed.token_ids), params)
        return processed
