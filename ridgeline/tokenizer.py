"""Tokenizer loading (with a converted-artifact cache for GGUF files) and streaming detokenization."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers.decoders import DecodeStream


def cache_dir() -> Path:
    """Where converted artifacts live: $RIDGELINE_CACHE_DIR, else $XDG_CACHE_HOME/ridgeline."""
    root = os.environ.get("RIDGELINE_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ridgeline"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def load_tokenizer(model_path: Path):
    """A transformers fast tokenizer for a checkpoint directory or GGUF file.

    Converting a GGUF vocabulary takes seconds, so the converted tokenizer is saved
    under the cache directory keyed by the file's SHA-256 and loaded from there next time.
    """
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if model_path.is_dir():
        if not ((model_path / "tokenizer.json").is_file() or (model_path / "tokenizer_config.json").is_file()):
            raise FileNotFoundError(f"model: {model_path} has no tokenizer.json")
        return AutoTokenizer.from_pretrained(str(model_path))
    target = cache_dir() / "tokenizers" / file_digest(model_path)
    if (target / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(target))
    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    tok.save_pretrained(str(tmp))
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return tok


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces; never emits half a UTF-8 character.

    The stream is primed with the tail of the prompt so that the first generated
    token is decoded in context (leading spaces, merges of byte-level pieces).
    """

    def __init__(self, tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True):
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        for tid in prompt_ids[-4:]:
            self._stream.step(self._backend, tid)

    def step(self, token_id: int) -> str:
        piece = self._stream.step(self._backend, token_id)
        return piece or ""
