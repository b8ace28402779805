"""ridgeline against llama.cpp on the same GGUF files, same machine, same run.

llama.cpp is built once from the vendored sources of the llama-cpp-python 0.3.36 sdist (Release,
-DGGML_NATIVE=ON, static, only llama-bench, llama-batched-bench and llama-quantize) and cached
with the model files it prepares under $RIDGELINE_CACHE_DIR (else $XDG_CACHE_HOME/ridgeline, else
~/.cache/ridgeline) / llamacpp-0.3.36/. Both are reused when present.

Files (--only):
  default  SmolLM2-135M-Instruct Q4_1 (ridgeline's default model, used in place)
  q8_0, q4_0, q4_k_m  the same model requantized with `llama-quantize --allow-requantize`
           (rows 576 wide are not a multiple of 256: q4_k_m falls back to Q5_0/Q8_0 for those tensors)
  1b       Llama-3.2-1B body (hidden 2048, 16 layers, 32 heads, 8 kv heads, ffn 8192, tied
           embeddings) with SmolLM2's vocabulary (49152) so both engines tokenize it; random weights
           written as F16, then Q4_K_M
  7b       Qwen2-7B body (hidden 3584, 28 layers, 28 heads, 4 kv heads, ffn 18944, q/k/v biases,
           untied lm_head), SmolLM2's vocabulary; F16 (~13 GB, deleted after quantizing) -> Q4_K_M.
           Skipped unless 40 GB of disk are free.

Workloads, threads = os.cpu_count() on both sides, median of --repeats:
  prefill   tok/s for a 512-token prompt. llama.cpp: `llama-bench -p 512 -n 0`; ridgeline: time of
            generate(max_tokens=1) on a 512-token prompt.
  decode    tok/s of one stream over 128 tokens. llama.cpp: `llama-bench -p 0 -n 128` (starts from
            an empty context); ridgeline: (time(max_tokens=129) - time(max_tokens=1)) / 128 on an
            8-token prompt.
  32-stream output tok/s for 32 prompts = 512 shared tokens + 32 unique tokens each -> 64 new tokens
            each, = 32 * 64 / wall time. ridgeline: one generate() call (prefix caching and its
            other defaults on). llama-batched-bench cannot express "shared prefix + unique suffix"
            in one run, so its time is the sum of three runs' phases:
              shared prefill  `-npp 512 -ntg 0 -npl 32 -pps`  (T_PP: the 512 tokens once)
              unique prompts  `-npp 32 -ntg 0 -npl 32`        (T_PP: 32 x 32 tokens in one batch;
                               they do not attend to the 512-token prefix, which slightly favours llama.cpp)
              generation      `-npp 544 -ntg 64 -npl 32 -pps` (T_TG: 64 steps of 32 streams whose
                               contexts start at 544 tokens)
  peak RSS  of each process, from /usr/bin/time (mapped weights included). llama.cpp: the largest of
            its runs (the 32-stream runs' -c 20480 KV cache dominates on small models); ridgeline: the
            worker subprocess that loads the model and runs every workload, with a KV pool of the
            same 20480 tokens.
  bandwidth decode tok/s x weight bytes read per token / memory read bandwidth
            (ridgeline.perf.probe.read_bandwidth, 512 MiB, measured at the start of the run). Bytes
            per token are the GGUF's tensor sizes (every tensor but the input embedding; the tied
            embedding counts as the lm_head) for both engines, so a fraction is of the file's limit.

ridgeline runs once per --activation-bytes value (its quant_activation_bytes): 1 (its default, 8-bit
activations, the numerics llama.cpp's kernels use) and 2 (~15 bits, greedy outputs follow float32).
Ratios are ridgeline / llama.cpp (above 1 = ridgeline faster; for RSS, above 1 = ridgeline larger).
Run it on an otherwise idle machine: with threads = every CPU, any other busy process (a test suite,
an OpenMP spin-wait) slows llama.cpp's 32-stream generation several times over (its threads meet at
a barrier per operator); the load average at the start and end is printed and recorded.

    .venv/bin/python benchmarks/bench_llamacpp.py [--only default,q8_0,q4_0,q4_k_m,1b,7b] [--repeats 3]
        [--skip-ridgeline] [--skip-llamacpp] [--prepare-only] [--json out.json] [--activation-bytes 1,2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ridgeline.tokenizer import cache_dir

LLAMACPP_VERSION = "0.3.36"
TOOLS = ["llama-bench", "llama-batched-bench", "llama-quantize"]
ALL_FILES = ["default", "q8_0", "q4_0", "q4_k_m", "1b", "7b"]
MIN_FREE_7B = 40e9

PREFILL_LEN = 512
DECODE_LEN = 128
DECODE_PROMPT = 8
STREAMS, SHARED, UNIQUE, NEW = 32, 512, 32, 64
KV_TOKENS = STREAMS * (SHARED + UNIQUE + NEW) + 1024  # llama-batched-bench -c, ridgeline's KV pool
SEED = 1234


# ---------------------------------------------------------------- llama.cpp build

def work_dir() -> Path:
    return cache_dir() / f"llamacpp-{LLAMACPP_VERSION}"


def build_dir() -> Path:
    return work_dir() / "build"


def models_dir() -> Path:
    return work_dir() / "models"


def tool(name: str) -> Path:
    return build_dir() / "bin" / name


def build_llamacpp(jobs: int = 2) -> None:
    """Download the sdist, configure and build the tools once; reuse them afterwards."""
    if all(tool(t).is_file() for t in TOOLS):
        return
    root = work_dir()
    root.mkdir(parents=True, exist_ok=True)
    src = root / f"llama_cpp_python-{LLAMACPP_VERSION}" / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        sdist = root / "sdist"
        tars = sorted(sdist.glob(f"llama_cpp_python-{LLAMACPP_VERSION}.tar.gz"))
        if not tars:
            print(f"downloading the llama-cpp-python {LLAMACPP_VERSION} sdist", flush=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMACPP_VERSION}", "-d", str(sdist)], check=True)
            tars = sorted(sdist.glob(f"llama_cpp_python-{LLAMACPP_VERSION}.tar.gz"))
        with tarfile.open(tars[-1]) as tf:
            tf.extractall(root, filter="data")
    print(f"building llama.cpp in {build_dir()} (-j{jobs}; takes a while)", flush=True)
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir()), *gen, "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    "-DLLAMA_BUILD_APP=OFF", "--no-warn-unused-cli"], check=True)
    subprocess.run(["cmake", "--build", str(build_dir()), "--config", "Release", "-j", str(jobs),
                    "--target", *TOOLS], check=True)


def run_measured(cmd: list[str]) -> tuple[str, int]:
    """Run cmd; return (stdout, peak RSS in bytes of that process alone).

    The peak comes from /usr/bin/time, whose child is forked from a small process: a process forked
    from this one (torch imported, a few hundred MB resident) has that resident set counted in its
    own ru_maxrss. Without /usr/bin/time, wait4's ru_maxrss (an overestimate for small processes)."""
    gnu_time = Path("/usr/bin/time")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        full = [str(gnu_time), "-f", "%M", "-o", report.name, *cmd] if gnu_time.is_file() else cmd
        proc = subprocess.Popen(full, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        lines = report.read().split()
        peak_kb = int(lines[-1]) if full is not cmd and lines and lines[-1].isdigit() else usage.ru_maxrss
    if proc.returncode != 0:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{tail}")
    return stdout, peak_kb * 1024


# ---------------------------------------------------------------- model files

@dataclass
class Shape:
    arch: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    context: int
    rope_theta: float
    rms_eps: float
    tied: bool
    qkv_bias: bool


SHAPES = {
    "1b": Shape("llama", 2048, 16, 32, 8, 8192, 8192, 500000.0, 1e-5, tied=True, qkv_bias=False),
    "7b": Shape("qwen2", 3584, 28, 28, 4, 18944, 32768, 1000000.0, 1e-6, tied=False, qkv_bias=True),
}
SYNTH_NAMES = {"1b": "llama-3.2-1b-shape-v49152", "7b": "qwen2-7b-shape-v49152"}


def default_path() -> Path:
    from ridgeline.loader import default_model_path
    return default_model_path()


def file_path(key: str) -> Path:
    if key == "default":
        return default_path()
    if key in SHAPES:
        return models_dir() / f"{SYNTH_NAMES[key]}.Q4_K_M.gguf"
    return models_dir() / f"{default_path().stem.rsplit('.', 1)[0]}.{key.upper()}.gguf"


def quantize(src: Path, dst: Path, qtype: str, requantize: bool) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    cmd = [str(tool("llama-quantize")), *(["--allow-requantize"] if requantize else []), str(src), str(tmp),
           qtype, str(os.cpu_count())]
    print("  " + " ".join(cmd), flush=True)
    run_measured(cmd)
    tmp.replace(dst)


def synthetic_tensors(s: Shape, vocab: int):
    """(name, numpy shape (rows = outputs, cols = inputs), is_norm_or_bias) in llama.cpp's naming."""
    head_dim = s.hidden // s.heads
    q, kv = s.heads * head_dim, s.kv_heads * head_dim
    yield "token_embd.weight", (vocab, s.hidden), False
    for i in range(s.layers):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (s.hidden,), True
        yield b + "attn_q.weight", (q, s.hidden), False
        yield b + "attn_k.weight", (kv, s.hidden), False
        yield b + "attn_v.weight", (kv, s.hidden), False
        if s.qkv_bias:
            yield b + "attn_q.bias", (q,), True
            yield b + "attn_k.bias", (kv,), True
            yield b + "attn_v.bias", (kv,), True
        yield b + "attn_output.weight", (s.hidden, q), False
        yield b + "ffn_norm.weight", (s.hidden,), True
        yield b + "ffn_gate.weight", (s.ffn, s.hidden), False
        yield b + "ffn_up.weight", (s.ffn, s.hidden), False
        yield b + "ffn_down.weight", (s.hidden, s.ffn), False
    yield "output_norm.weight", (s.hidden,), True
    if not s.tied:
        yield "output.weight", (vocab, s.hidden), False


def write_synthetic_f16(path: Path, s: Shape, name: str) -> None:
    """An F16 GGUF with random weights (normal * 0.02), written tensor by tensor in chunks so that
    memory stays low; tokenizer metadata copied from the default model."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(default_path()))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    w = gguf.GGUFWriter(str(path), s.arch)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    a = s.arch
    w.add_uint32(f"{a}.context_length", s.context)
    w.add_uint32(f"{a}.embedding_length", s.hidden)
    w.add_uint32(f"{a}.block_count", s.layers)
    w.add_uint32(f"{a}.feed_forward_length", s.ffn)
    w.add_uint32(f"{a}.attention.head_count", s.heads)
    w.add_uint32(f"{a}.attention.head_count_kv", s.kv_heads)
    w.add_float32(f"{a}.rope.freq_base", s.rope_theta)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
    w.add_uint32(f"{a}.rope.dimension_count", s.hidden // s.heads)
    w.add_uint32(f"{a}.vocab_size", vocab)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    specs = list(synthetic_tensors(s, vocab))
    for tname, shape, small in specs:
        n = int(np.prod(shape))
        w.add_tensor_info(tname, shape, np.dtype(np.float32 if small else np.float16), n * (4 if small else 2))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # One pool of random values, read cyclically from a random offset per tensor: the values only
    # need to be weight-like, and drawing ~7 G normals would take minutes.
    rng = np.random.default_rng(SEED)
    pool = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(np.float16)
    fout = w.fout[0]
    chunk = 1 << 22
    for tname, shape, small in specs:
        n = int(np.prod(shape))
        ti = w.tensors[0].pop(tname)
        w.write_padding(fout, fout.tell())
        if small:  # norms: 1, biases: small values
            arr = np.ones(n, np.float32) if tname.endswith("norm.weight") else pool[:n].astype(np.float32)
            arr.tofile(fout)
        else:
            pos, left = int(rng.integers(len(pool))), n
            while left:
                k = min(left, chunk, len(pool) - pos)
                pool[pos:pos + k].tofile(fout)
                left -= k
                pos = (pos + k) % len(pool)
        w.write_padding(fout, ti.nbytes)
    w.close()


def prepare(key: str) -> Path | None:
    """Return the file for `key`, creating it when missing; None when it cannot be made here."""
    path = file_path(key)
    if path.is_file():
        return path
    models_dir().mkdir(parents=True, exist_ok=True)
    if key in ("q8_0", "q4_0", "q4_k_m"):
        print(f"preparing {path.name}", flush=True)
        quantize(default_path(), path, key.upper(), requantize=True)
        return path
    s = SHAPES[key]
    vocab = 49152
    params = sum(math.prod(sh) for _, sh, _ in synthetic_tensors(s, vocab))
    f16_bytes = 2 * params
    free = shutil.disk_usage(models_dir()).free
    need = MIN_FREE_7B if key == "7b" else 1.5 * f16_bytes
    if free < need:
        print(f"skipping {key}: {free / 1e9:.0f} GB free in {models_dir()}, it needs {need / 1e9:.0f} GB", flush=True)
        return None
    f16 = models_dir() / f"{SYNTH_NAMES[key]}.F16.gguf"
    print(f"preparing {path.name}: {params / 1e9:.2f} B parameters, {f16_bytes / 1e9:.1f} GB F16 first", flush=True)
    try:
        if not f16.is_file():
            tmp = f16.with_name(f16.name + ".tmp")
            write_synthetic_f16(tmp, s, SYNTH_NAMES[key])
            tmp.replace(f16)
        quantize(f16, path, "Q4_K_M", requantize=False)
    finally:
        f16.unlink(missing_ok=True)
    return path


def gguf_summary(path: Path) -> dict:
    """Weight bytes a decode step reads (from the file's formats) and the tensor types."""
    import gguf

    r = gguf.GGUFReader(str(path))
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    types: dict[str, int] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    total = sum(sizes.values())
    per_token = total if "output.weight" not in sizes else total - sizes["token_embd.weight"]
    return {"weight_bytes": total, "weight_bytes_per_token": per_token, "tensor_types": types,
            "file_bytes": path.stat().st_size}


# ---------------------------------------------------------------- llama.cpp side

def bench_llamacpp(path: Path, repeats: int, threads: int) -> dict:
    t = str(threads)
    cmds = {}

    def bench(args: list[str]) -> tuple[float, list, int]:
        cmd = [str(tool("llama-bench")), "-m", str(path), *args, "-t", t, "-r", str(repeats), "-o", "json"]
        out, rss = run_measured(cmd)
        rows = json.loads(out)
        return statistics.median(rows[0]["samples_ts"]), cmd, rss

    prefill, cmds["prefill"], rss_p = bench(["-p", str(PREFILL_LEN), "-n", "0"])
    decode, cmds["decode"], rss_d = bench(["-p", "0", "-n", str(DECODE_LEN)])

    ctx = KV_TOKENS

    def batched(args: list[str]) -> tuple[dict, list, int]:
        cmd = [str(tool("llama-batched-bench")), "-m", str(path), "-c", str(ctx), "-b", "2048", "-ub", "512",
               "-npl", str(STREAMS), *args, "-t", t, "-tb", t, "--output-format", "jsonl"]
        out, rss = run_measured(cmd)
        # -ntg 0 makes S_TG 0/0, printed as a bare nan that JSON does not allow
        rows = [json.loads(re.sub(r":\s*-?(nan|inf)\b", ": null", line))
                for line in out.splitlines() if line.startswith("{")]
        assert len(rows) == 1, out
        return rows[0], cmd, rss

    shared, unique, gen, rss_b = [], [], [], 0
    for _ in range(repeats):
        row, cmds["32-stream shared prefill"], r1 = batched(["-npp", str(SHARED), "-ntg", "0", "-pps"])
        shared.append(row["t_pp"])
        row, cmds["32-stream unique prompts"], r2 = batched(["-npp", str(UNIQUE), "-ntg", "0"])
        unique.append(row["t_pp"])
        row, cmds["32-stream generation"], r3 = batched(["-npp", str(SHARED + UNIQUE), "-ntg", str(NEW), "-pps"])
        gen.append(row["t_tg"])
        rss_b = max(rss_b, r1, r2, r3)
    t_total = statistics.median(shared) + statistics.median(unique) + statistics.median(gen)
    return {"prefill_tok_s": prefill, "decode_tok_s": decode, "streams_tok_s": STREAMS * NEW / t_total,
            "peak_rss_bytes": max(rss_p, rss_d, rss_b),
            "streams_phases_s": {"shared_prefill": statistics.median(shared),
                                 "unique_prompts": statistics.median(unique),
                                 "generation": statistics.median(gen)},
            "commands": {k: " ".join(v) for k, v in cmds.items()}}


# ---------------------------------------------------------------- ridgeline side

def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def ridgeline_worker(path: str, repeats: int, threads: int, activation_bytes: int) -> dict:
    """Runs in a subprocess of its own, so that its peak RSS is ridgeline's alone."""
    import torch

    from ridgeline import LLM, SamplingParams
    from ridgeline.engine import EngineConfig, resolve_dtype
    from ridgeline.loader import load_model_config

    torch.set_num_threads(threads)
    # A KV pool of the size llama-batched-bench gets (-c), so that the peak RSS compares like with like.
    mc = load_model_config(path)
    try:
        elem = resolve_dtype("auto", torch.device("cpu")).itemsize
    except Exception:
        elem = 2
    kv_bytes = KV_TOKENS * mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * elem
    opts = {"max_model_len": 2048, "kv_cache_memory": kv_bytes, "quant_activation_bytes": activation_bytes}
    if "num_threads" in EngineConfig.__dataclass_fields__:
        opts["num_threads"] = threads
    t0 = time.perf_counter()
    llm = LLM(model=path, **opts)
    load_s = time.perf_counter() - t0
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(SEED)

    def ids(n: int) -> list[int]:  # fresh random tokens each time: no prefix-cache hits between runs
        return [rng.randrange(16, vocab) for _ in range(n)]

    def sp(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    def timed(prompts: list[list[int]], n: int) -> float:
        t = time.perf_counter()
        outs = llm.generate(prompts, sp(n), use_tqdm=False)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return dt

    # warm-up: every path once (kernels compiled or loaded at first use)
    timed([ids(PREFILL_LEN)], 1)
    timed([ids(DECODE_PROMPT)], 16)
    pre = ids(64)
    timed([pre + ids(8) for _ in range(STREAMS)], 4)

    prefill = [timed([ids(PREFILL_LEN)], 1) for _ in range(repeats)]
    first = [timed([ids(DECODE_PROMPT)], 1) for _ in range(repeats)]
    full = [timed([ids(DECODE_PROMPT)], DECODE_LEN + 1) for _ in range(repeats)]
    streams = []
    for _ in range(repeats):
        shared = ids(SHARED)
        streams.append(timed([shared + ids(UNIQUE) for _ in range(STREAMS)], NEW))
    res = {"prefill_tok_s": PREFILL_LEN / statistics.median(prefill),
           "decode_tok_s": DECODE_LEN / (statistics.median(full) - statistics.median(first)),
           "streams_tok_s": STREAMS * NEW / statistics.median(streams),
           "load_s": load_s, "dtype": str(llm.engine.dtype).removeprefix("torch."),
           "threads": torch.get_num_threads()}
    res["peak_rss_bytes"] = vm_hwm_bytes()
    return res


def bench_ridgeline(path: Path, repeats: int, threads: int, activation_bytes: int = 2) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ridgeline-worker", str(path),
           "--repeats", str(repeats), "--threads", str(threads), "--activation-bytes", str(activation_bytes)]
    out, rss = run_measured(cmd)
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_bytes"] = rss or res["peak_rss_bytes"]
    return res


# ---------------------------------------------------------------- main

def measure_bandwidth(threads: int) -> float:
    import torch

    from ridgeline.perf.probe import read_bandwidth

    torch.set_num_threads(threads)
    return max(read_bandwidth(torch.device("cpu"), 512 << 20) for _ in range(3))


def cpu_description() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
        return f"{name}, {os.cpu_count()} CPUs"
    except Exception:
        return platform.processor() or platform.machine()


def ridgeline_side(activation_bytes: int) -> str:
    return "ridgeline" if activation_bytes == 1 else f"ridgeline {activation_bytes}-byte"


METRICS = [("prefill_tok_s", f"prefill tok/s ({PREFILL_LEN}-token prompt)", "{:.1f}"),
           ("decode_tok_s", f"decode tok/s (1 stream, {DECODE_LEN} tokens)", "{:.1f}"),
           ("streams_tok_s", f"{STREAMS} streams x ({SHARED}+{UNIQUE}) -> {NEW}, output tok/s", "{:.1f}"),
           ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
           ("bandwidth_fraction", "decode, fraction of bandwidth limit", "{:.0%}")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(ALL_FILES),
                    help=f"comma-separated files to run, from {','.join(ALL_FILES)} (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-ridgeline", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--prepare-only", action="store_true", help="build llama.cpp and prepare the files, then stop")
    ap.add_argument("--build-jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--activation-bytes", default="1,2",
                    help="ridgeline's quant_activation_bytes, one run each: 1 = its default (llama.cpp's "
                         "8-bit activations), 2 = ~15 bits (default: 1,2)")
    ap.add_argument("--ridgeline-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.ridgeline_worker:
        print(json.dumps(ridgeline_worker(args.ridgeline_worker, args.repeats, args.threads,
                                          int(args.activation_bytes.split(",")[0]))))
        return

    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    bad = [k for k in keys if k not in ALL_FILES]
    if bad:
        ap.error(f"--only: unknown {','.join(bad)}; choose from {','.join(ALL_FILES)}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    build_llamacpp(args.build_jobs)  # llama-quantize prepares the files even with --skip-llamacpp
    paths = {}
    for k in keys:
        p = prepare(k)
        if p is not None:
            paths[k] = p
    if args.prepare_only:
        for k, p in paths.items():
            print(f"{k:8s} {p}")
        return

    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        print(f"warning: load average {load1:.1f} before the run; other processes share these "
              f"{os.cpu_count()} CPUs and will slow both engines (llama.cpp's spinning threads most)", flush=True)
    bandwidth = measure_bandwidth(args.threads)
    print(f"{cpu_description()}; {args.threads} threads; memory read bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"median of {args.repeats}", flush=True)
    results = {"cpu": cpu_description(), "threads": args.threads, "repeats": args.repeats,
               "bandwidth_bytes_s": bandwidth, "loadavg_start": load1, "llamacpp_version": f"llama-cpp-python {LLAMACPP_VERSION}",
               "files": {}}
    for k, p in paths.items():
        info = gguf_summary(p)
        entry = {"path": str(p), **info}
        print(f"\n== {k}: {p.name} ({info['file_bytes'] / 1e6:.0f} MB; "
              f"{', '.join(f'{n} {t}' for t, n in sorted(info['tensor_types'].items()))})", flush=True)
        sides = []
        if not args.skip_llamacpp:
            sides.append(("llama.cpp", bench_llamacpp))
        if not args.skip_ridgeline:
            for nb in args.activation_bytes.split(","):
                sides.append((ridgeline_side(int(nb)),
                              lambda p, r, t, nb=int(nb): bench_ridgeline(p, r, t, nb)))
        for name, fn in sides:
            try:
                r = fn(p, args.repeats, args.threads)
            except Exception as exc:  # report and go on with the other side / files
                msg = str(exc).strip().splitlines()
                print(f"  {name} failed: {msg[-1] if msg else type(exc).__name__}", flush=True)
                entry[name] = {"error": str(exc)}
                continue
            r["peak_rss_mb"] = r["peak_rss_bytes"] / 1e6
            r["bandwidth_fraction"] = r["decode_tok_s"] * info["weight_bytes_per_token"] / bandwidth
            entry[name] = r
            print("  " + name + ": " + ", ".join(f"{label} {fmt.format(r[m])}" for m, label, fmt in METRICS),
                  flush=True)
        results["files"][k] = entry
        if args.json:  # after every file, so that a long run leaves what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=2))

    results["loadavg_end"] = os.getloadavg()[0]
    print(f"\n{results['cpu']}; {args.threads} threads; bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"median of {args.repeats}; load average {load1:.1f} at the start, {results['loadavg_end']:.1f} "
          f"at the end; ratio = ridgeline / llama.cpp\n")
    rl_sides = [ridgeline_side(int(nb)) for nb in args.activation_bytes.split(",")]
    print("| file | metric | llama.cpp | " + " | ".join(f"{s} | ratio" for s in rl_sides) + " |")
    print("|---|---|---|" + "---|---|" * len(rl_sides))
    for k, entry in results["files"].items():
        lc = entry.get("llama.cpp", {})
        for m, label, fmt in METRICS:
            cells = [fmt.format(lc[m]) if m in lc else "-"]
            for side in rl_sides:
                rl = entry.get(side, {})
                cells.append(fmt.format(rl[m]) if m in rl else "-")
                cells.append(f"{rl[m] / lc[m]:.2f}x" if m in lc and m in rl and lc[m] else "-")
            print(f"| {k} | {label} | " + " | ".join(cells) + " |")
    for k, entry in results["files"].items():
        for side in ("llama.cpp", *rl_sides):
            if "error" in entry.get(side, {}):
                last = entry[side]["error"].strip().splitlines()
                print(f"{k}: {side} failed: {last[-1] if last else ''}")
    runs = [e["llama.cpp"]["commands"] for e in results["files"].values() if "commands" in e.get("llama.cpp", {})]
    if runs:
        print("\nllama.cpp commands (the last file's):")
        for name, cmd in runs[-1].items():
            print(f"  {name}: {cmd}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
