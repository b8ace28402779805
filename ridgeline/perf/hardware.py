"""Hardware specs: peak rates from datasheets or from `ridgeline perf probe`, plus the
efficiency and overhead terms that `ridgeline perf calibrate` fits.

A spec is what the roofline needs: matrix-multiply peak per dtype, memory bandwidth and
capacity. The efficiency terms say which fraction of a peak real kernels reach; the
overheads are the time no roofline sees (kernel launch or Python dispatch per operator,
host work per engine step and per sequence). Datasheet entries carry default efficiencies
typical of tuned GPU kernels; a calibrated spec replaces them with fitted values.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

TB = 1e12
GB = 1e9
GiB = 1 << 30

# Bytes per element of the dtypes the model can be asked about (int4: 4 bits plus an fp16
# scale per group of 32, as in Q4_0-like formats), and of the GGUF block formats ridgeline keeps
# as they are (bytes per block / weights per block: Q4_K 144 / 256 = 4.5 bits, Q6_K 6.5625 ...).
GGUF_FORMAT_BYTES = {"q4_0": 18 / 32, "q4_1": 20 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32, "q8_0": 34 / 32,
                     "q4_k": 144 / 256, "q5_k": 176 / 256, "q6_k": 210 / 256}
DTYPE_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5625,
               **GGUF_FORMAT_BYTES}


class HardwareSpecError(ValueError):
    """A hardware spec that is unknown, malformed or physically impossible."""


@dataclass
class HardwareSpec:
    name: str
    peak_flops: dict[str, float]  # dense matrix-multiply FLOP/s per compute dtype
    memory_bandwidth: float  # bytes/s
    memory_capacity: float  # bytes usable for weights, KV cache and activations
    source: str = ""
    compute_efficiency: float = 0.7  # GEMM fraction of peak reached
    memory_efficiency: float = 0.8  # fraction of bandwidth streaming kernels reach
    # Attention's own factors on top of those two: its FLOPs (prefill: QK^T and PV over the
    # chunk) and its KV reads (decode: gathers, padding) run on other kernels than GEMMs do.
    attention_compute_efficiency: float = 0.6
    attention_memory_efficiency: float = 0.6
    # Share of the K/V reads a shared-prefix (Hydragen) part avoids that the device's kernels
    # really save: the grouped product is a different kernel with its own cost.
    shared_prefix_efficiency: float = 0.8
    op_overhead_s: float = 5e-6  # per operator: kernel launch or Python dispatch
    step_overhead_s: float = 1e-3  # per engine step: scheduling, metadata, sampling set-up
    seq_overhead_s: float = 2e-5  # per sequence per step: host bookkeeping, detokenization
    memory_utilization: float = 0.9  # share of capacity the engine may use
    calibrated: dict | None = None  # fit report when the efficiencies were measured
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str, value) -> None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                    or value <= 0:
                raise HardwareSpecError(f"hardware spec {self.name!r}: {name} must be a positive number, "
                                        f"got {value!r}")

        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise HardwareSpecError(f"hardware spec name must be letters, digits, '.', '_' or '-', got {self.name!r}")
        if not isinstance(self.peak_flops, dict) or not self.peak_flops:
            raise HardwareSpecError(f"hardware spec {self.name!r}: peak_flops must map dtypes to FLOP/s")
        for dtype, value in self.peak_flops.items():
            if dtype not in DTYPE_BYTES:
                raise HardwareSpecError(f"hardware spec {self.name!r}: peak_flops dtype {dtype!r} is unknown; "
                                        f"known: {', '.join(DTYPE_BYTES)}")
            positive(f"peak_flops[{dtype}]", value)
        positive("memory_bandwidth", self.memory_bandwidth)
        positive("memory_capacity", self.memory_capacity)
        for name in ("compute_efficiency", "memory_efficiency", "attention_compute_efficiency",
                     "attention_memory_efficiency", "shared_prefix_efficiency", "memory_utilization"):
            value = getattr(self, name)
            positive(name, value)
            cap = 1.0 if name == "shared_prefix_efficiency" else 1.5
            if value > cap:
                raise HardwareSpecError(f"hardware spec {self.name!r}: {name} must be in (0, {cap}], got {value}")
        for name in ("op_overhead_s", "step_overhead_s", "seq_overhead_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise HardwareSpecError(f"hardware spec {self.name!r}: {name} must be >= 0, got {value!r}")

    def peak(self, dtype: str) -> float:
        """Matrix-multiply peak for a compute dtype; int4 weights compute in 16-bit."""
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        for fallback in {"int4": ("bfloat16", "float16"), "fp8": ("bfloat16", "float16"),
                         "int8": ("bfloat16", "float16"), "float16": ("bfloat16",),
                         "bfloat16": ("float16",)}.get(dtype, ()):
            if fallback in self.peak_flops:
                return self.peak_flops[fallback]
        raise HardwareSpecError(f"hardware {self.name!r} has no peak for dtype {dtype!r}; "
                                f"it lists {', '.join(self.peak_flops)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HardwareSpec":
        if not isinstance(data, dict):
            raise HardwareSpecError("a hardware spec must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise HardwareSpecError(f"hardware spec has unknown fields: {', '.join(unknown)}")
        missing = [k for k in ("name", "peak_flops", "memory_bandwidth", "memory_capacity") if k not in data]
        if missing:
            raise HardwareSpecError(f"hardware spec is missing fields: {', '.join(missing)}")
        return cls(**data)


def _gpu(name: str, flops: dict[str, float], bandwidth: float, capacity: float, source: str) -> HardwareSpec:
    return HardwareSpec(name=name, peak_flops=flops, memory_bandwidth=bandwidth, memory_capacity=capacity,
                        source=source)


# Dense (no 2:4 sparsity) tensor-core peaks from the vendors' datasheets.
REGISTRY: dict[str, HardwareSpec] = {s.name: s for s in (
    _gpu("h100-sxm", {"float32": 67 * TB, "bfloat16": 989.4 * TB, "float16": 989.4 * TB, "fp8": 1978.9 * TB,
                      "int8": 1978.9 * TB}, 3.35 * TB, 80 * GB,
         "NVIDIA H100 Tensor Core GPU datasheet (SXM5): dense BF16 989 TFLOPS, HBM3 3.35 TB/s, 80 GB"),
    _gpu("h200", {"float32": 67 * TB, "bfloat16": 989.4 * TB, "float16": 989.4 * TB, "fp8": 1978.9 * TB,
                  "int8": 1978.9 * TB}, 4.8 * TB, 141 * GB,
         "NVIDIA H200 Tensor Core GPU datasheet (SXM): dense BF16 989 TFLOPS, HBM3e 4.8 TB/s, 141 GB"),
    _gpu("a100-80gb", {"float32": 19.5 * TB, "bfloat16": 312 * TB, "float16": 312 * TB, "int8": 624 * TB},
         2.039 * TB, 80 * GB,
         "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM): BF16 312 TFLOPS, HBM2e 2,039 GB/s"),
    _gpu("l4", {"float32": 30.3 * TB, "bfloat16": 121 * TB, "float16": 121 * TB, "fp8": 242.5 * TB,
                "int8": 242.5 * TB}, 300 * GB, 24 * GB,
         "NVIDIA L4 datasheet: FP16/BF16 242 TFLOPS with sparsity (121 dense), GDDR6 300 GB/s, 24 GB"),
    _gpu("rtx-4090", {"float32": 82.6 * TB, "bfloat16": 165.2 * TB, "float16": 165.2 * TB, "fp8": 330.3 * TB,
                      "int8": 660.6 * TB}, 1008 * GB, 24 * GB,
         "NVIDIA Ada Lovelace architecture whitepaper (RTX 4090): FP16 tensor 165.2 TFLOPS with FP32 "
         "accumulate, GDDR6X 1,008 GB/s, 24 GB"),
    _gpu("mi300x", {"float32": 163.4 * TB, "bfloat16": 1307.4 * TB, "float16": 1307.4 * TB,
                    "fp8": 2614.9 * TB, "int8": 2614.9 * TB}, 5.3 * TB, 192 * GB,
         "AMD Instinct MI300X datasheet: dense FP16/BF16 1,307.4 TFLOPS, HBM3 5.3 TB/s, 192 GB"),
    _gpu("apple-m2-ultra", {"float32": 27.2 * TB, "bfloat16": 27.2 * TB, "float16": 27.2 * TB}, 800 * GB,
         192 * GB,
         "Apple M2 Ultra (76-core GPU): 800 GB/s unified memory, up to 192 GB (Apple newsroom, June 2023); "
         "FP32 27.2 TFLOPS = 76 cores x 128 lanes x 2 x 1.4 GHz; Metal runs FP16/BF16 at the FP32 rate"),
    HardwareSpec(
        name="epyc-2c", peak_flops={"float32": 200.4e9, "bfloat16": 500.2e9},
        memory_bandwidth=72.8 * GB, memory_capacity=24 * GiB,
        compute_efficiency=1.113, memory_efficiency=0.721,
        attention_compute_efficiency=0.254, attention_memory_efficiency=0.2112,
        shared_prefix_efficiency=0.596, op_overhead_s=5.19e-06,
        step_overhead_s=0.00172, seq_overhead_s=1.08e-05,
        calibrated={"model": "SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "bfloat16", "samples": 10,
                    "holdout_mape": 8.2, "holdout_shapes": 46, "date": "2026-11-23",
                    "engine": "fused CPU kernels"},
        source="ridgeline's CI VM (2 AMD EPYC cores, AVX-512 BF16): peaks from `ridgeline perf probe`, "
               "efficiencies and overheads from `ridgeline perf calibrate` (ridgeline's engine), 2026-11-23"),
)}


def spec_dir() -> Path:
    """User specs (probed or calibrated) live beside ridgeline's other cached artifacts."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ridgeline" / "hardware"


def local_spec_name() -> str:
    """The name this machine's probed or calibrated spec is saved under: 'local-' and the device
    model (the CPU's model name and kernel ISA, or the GPU's name), so a spec fitted on one
    machine is never silently used on another. `--hardware local` means this name."""
    try:
        import torch

        if torch.cuda.is_available():
            return "local-" + _slug(torch.cuda.get_device_name())
    except ImportError:
        pass
    from ..kernels import cpu_isa

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.partition(":")[2] for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import platform

    return f"local-{_slug(model or platform.processor() or platform.machine())}-{cpu_isa()}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60] or "unknown"


def save_spec(spec: HardwareSpec, path: Path | None = None) -> Path:
    path = path or spec_dir() / f"{spec.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(spec.to_dict(), indent=2) + "\n")
    tmp.replace(path)
    return path


def load_spec(name_or_path: str) -> HardwareSpec:
    """A registry name, a saved user spec (e.g. 'local'), or a path to a spec JSON file."""
    if name_or_path.endswith(".json"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise HardwareSpecError(f"hardware spec file {str(path)!r} does not exist")
    else:
        local = name_or_path == "local"
        if local:
            name_or_path = local_spec_name()
        path = spec_dir() / f"{name_or_path}.json"
        if not path.is_file():
            if name_or_path in REGISTRY:
                return HardwareSpec.from_dict(REGISTRY[name_or_path].to_dict())
            hint = (f"; 'local' is this machine's spec, {name_or_path!r}: run `ridgeline perf calibrate` "
                    "(or `ridgeline perf probe`) first" if local else "")
            raise HardwareSpecError(f"unknown hardware {name_or_path!r}; known: "
                                    f"{', '.join(available_specs())}{hint}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise HardwareSpecError(f"hardware spec {path} is not valid JSON ({exc})") from exc
    return HardwareSpec.from_dict(data)


def available_specs() -> list[str]:
    saved = sorted(p.stem for p in spec_dir().glob("*.json")) if spec_dir().is_dir() else []
    return list(REGISTRY) + [s for s in saved if s not in REGISTRY]
