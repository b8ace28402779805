"""A GGUF file: its metadata, tensor directory and memory-mapped tensor bytes.

The `gguf` package's reader builds a numpy view for every field and array element (seconds for
a 49k-token vocabulary); this one parses the header in one pass over the memory map with
`struct`, reads numeric arrays as single numpy views, and touches no tensor data until asked.
A tensor's bytes are handed out one at a time (`tensor_bytes`) and released from the process's
resident memory afterwards (`release`), so loading never holds a second copy of the model.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import UnsupportedModelError

# GGML tensor types: id -> (name, weights per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (PyTorch order: GGUF lists dimensions innermost first)
    type_id: int
    offset: int  # from the start of the file

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type {self.type_id}", 1, 1))[0]

    @property
    def nbytes(self) -> int:
        _, weights, size = GGML_TYPES[self.type_id]
        count = 1
        for d in self.shape:
            count *= d
        return count // weights * size


class GGUFFile:
    """Open a GGUF file: `metadata` (key -> value; numeric arrays as numpy, string arrays as
    lists), `tensors` (name -> TensorInfo, in file order). Raises UnsupportedModelError for a
    file that is not GGUF v2/v3 or is cut short."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            try:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError as exc:  # an empty file
                raise UnsupportedModelError(f"model: {self.path} is not a GGUF file (empty)") from exc
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, ValueError) as exc:
            self.close()
            if isinstance(exc, UnsupportedModelError):
                raise
            raise UnsupportedModelError(f"model: {self.path} is not a readable GGUF file ({exc})") from exc

    # ---------------------------------------------------------------- header

    def _read(self, fmt: str):
        v = struct.unpack_from(fmt, self._map, self._pos)
        self._pos += struct.calcsize(fmt)
        return v[0]

    def _string(self) -> str:
        n = self._read("<Q")
        s = self._map[self._pos:self._pos + n]
        if len(s) != n:
            raise ValueError("string runs past the end of the file")
        self._pos += n
        return s.decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._read("<I"), self._read("<Q")
            if etype in _NUMPY:
                arr = np.frombuffer(self._map, dtype=_NUMPY[etype], count=count, offset=self._pos).copy()
                self._pos += arr.nbytes
                return arr  # a copy, so the map can close while the metadata lives on
            if etype == _STRING:
                return self._string_array(count)
            return [self._value(etype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")

    def _string_array(self, count: int) -> list[str]:
        buf, pos, out = self._map, self._pos, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            (n,) = unpack(buf, pos)
            out.append(buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
            pos += 8 + n
        if pos > len(buf):
            raise ValueError("string array runs past the end of the file")
        self._pos = pos
        return out

    def _parse(self) -> None:
        if self._map[:4] != b"GGUF":
            raise UnsupportedModelError(f"model: {self.path} is not a GGUF file (bad magic)")
        self._pos = 4
        version = self._read("<I")
        if version not in (2, 3):
            raise UnsupportedModelError(f"model: {self.path} is GGUF version {version}; supported: 2, 3")
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._read("<Q") for _ in range(self._read("<I"))]
            infos.append((name, tuple(reversed(dims)), self._read("<I"), self._read("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = (self._pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, type_id, offset in infos:
            info = TensorInfo(name, shape, type_id, data_start + offset)
            if type_id in GGML_TYPES and info.offset + info.nbytes > len(self._map):
                raise UnsupportedModelError(f"model: {self.path} is truncated (tensor {name} ends past the file)")
            self.tensors[name] = info

    # ---------------------------------------------------------------- tensor data

    def tensor_bytes(self, info: TensorInfo) -> np.ndarray:
        """The tensor's raw bytes: a read-only uint8 view of the memory map (no copy)."""
        if info.type_id not in GGML_TYPES:
            raise UnsupportedModelError(f"GGUF tensor {info.name} has unknown type id {info.type_id}")
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def release(self, info: TensorInfo) -> None:
        """Drop the tensor's pages from this process's resident set (they stay in the page cache),
        once its bytes have been copied into the form the engine keeps."""
        start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._map.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)
        except (AttributeError, OSError, ValueError):  # no madvise here: the kernel reclaims them later
            pass

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a numpy view still exists; the map closes when it is collected
            pass
