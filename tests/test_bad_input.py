"""Every bad input gets a clear error naming the field; requests in flight are unaffected."""

from __future__ import annotations

import json

import pytest

from ridgeline import LLM, SamplingParams
from ridgeline.config import UnsupportedModelError


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"logprobs": 50}, "logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"stop": [""]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"seed": "x"}, "seed"),
    ({"temperature": "hot"}, "temperature"),
])
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


def test_bad_prompts_leave_others_untouched(llm_fp32):
    engine = llm_fp32.engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm_fp32.generate(["Good morning"], params, use_tqdm=False)[0].outputs[0].token_ids
    rid = engine.add_request("Good morning", params)
    engine.step()  # the good request is in flight
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request("", params)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request({"prompt_token_ids": [100] * engine.max_model_len}, params)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        engine.add_request([10**9], params)
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request("x", SamplingParams(stop_token_ids=[10**9]))
    with pytest.raises(TypeError, match="prompt"):
        engine.add_request(3.14, params)
    done = None
    while done is None:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                done = out
    assert done.outputs[0].token_ids == alone
    assert not engine._scheduler.running and not engine._scheduler.waiting


def test_bad_batch_rejected_whole(llm_fp32):
    with pytest.raises(ValueError, match="prompt"):
        llm_fp32.generate(["fine", ""], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm_fp32.engine._scheduler.waiting and not llm_fp32.engine._requests


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM(model=str(tmp_path / "nope.gguf"))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedModelError, match="bert"):
        LLM(model=str(tmp_path))


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        LLM(model=str(path))


def test_bad_engine_options():
    with pytest.raises(ValueError, match="dtype"):
        LLM(dtype="int3")
    with pytest.raises(ValueError, match="kv_cache_memory"):
        LLM(kv_cache_memory="lots")
    with pytest.raises(TypeError, match="unknown options"):
        LLM(temprature=0.5)


def test_unsupported_gguf_refused_from_its_header(tmp_path):
    """A GGUF of an architecture ridgeline does not run (phi3, 64 MiB of tensor data): refused,
    naming the architecture, in under a second (the header is parsed, no tensor data read).
    (Gemma-3-270M, this test's file before Gemma was supported, is run in test_gemma.py.)"""
    import time

    import gguf
    import numpy as np

    path = tmp_path / "phi3.gguf"
    w = gguf.GGUFWriter(str(path), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4096, 4096), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    start = time.perf_counter()
    with pytest.raises(UnsupportedModelError, match="'phi3' is not supported"):
        LLM(model=str(path))
    assert time.perf_counter() - start < 1.0


def test_out_of_memory_says_what_and_what_to_change(monkeypatch):
    from ridgeline import engine

    # a KV pool larger than this machine's memory: the allocation fails up front
    with pytest.raises(MemoryError, match=r"allocating the KV cache \(.* GiB\): lower kv_cache_memory"):
        LLM(kv_cache_memory="4096GiB", max_model_len=256)

    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(engine, "load_checkpoint", no_memory)
    with pytest.raises(MemoryError, match="loading the model's weights: use a smaller quantization"):
        LLM()
