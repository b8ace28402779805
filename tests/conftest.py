"""Shared fixtures: the default model loaded once per test session (float32 with dequantized
weights: the reference path that transformers' GGUF loader matches)."""

from __future__ import annotations

import pytest
import torch

from ridgeline import LLM
from ridgeline.loader import default_model_path

torch.manual_seed(0)


@pytest.fixture(scope="session")
def llm_fp32() -> LLM:
    return LLM(dtype="float32", max_model_len=4096, kv_cache_memory="512MiB", quantization="none")


@pytest.fixture(scope="session")
def hf_default_model():
    """transformers' own GGUF loader (dequantizes to float32): the parity reference."""
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return model
