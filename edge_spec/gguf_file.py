"""Checks on a GGUF file before llama.cpp sees it, so bad input gets a clear one-line error."""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass

from .types import EdgespecError

GGUF_MAGIC = b"GGUF"


def check_gguf(path: str | os.PathLike) -> None:
    """Raise EdgespecError unless `path` looks like a complete GGUF file.

    Checks existence, the magic number and version here; a truncated file is caught by
    llama.cpp's own bounds check on tensor data when it loads, and reported the same way.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise EdgespecError(f"no such model file: {path} (give a .gguf path, or run without a model to use the defaults)")
    if not os.path.isfile(path):
        raise EdgespecError(f"{path} is not a file: give the path of a .gguf model")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise EdgespecError(f"{path} is not a GGUF file (it does not start with 'GGUF'): convert it with llama.cpp's convert_hf_to_gguf.py")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in (2, 3):
        raise EdgespecError(f"{path} is GGUF version {version}; edgespec reads versions 2 and 3")


# --- reading the header: metadata and tensor infos, without touching tensor data -------------
# gguf.GGUFReader builds numpy arrays of every metadata array (8.5 s for Qwen2.5's 152k-token
# vocabulary here); planning needs sizes and shapes only, so arrays are skipped, not decoded.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_TENSORS = 1 << 20
MAX_DIMS = 8
SHORT_ARRAY = 64  # arrays up to this length are decoded (per-layer head counts); longer ones skipped


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array that was skipped: its element type and length."""

    type: int
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: str
    version: int
    metadata: dict
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    file_size: int


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise EdgespecError(f"{self.path} is truncated or corrupt: a field at byte {self.pos} "
                                f"needs {n} bytes but the file ends at {len(self.buf)}")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        start = self.take(n)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype == _ARRAY:
                raise EdgespecError(f"{self.path}: nested metadata arrays are not supported")
            if count <= SHORT_ARRAY:
                return [self.value(etype) for _ in range(count)]
            if etype in _SCALARS:
                self.take(count * struct.calcsize(_SCALARS[etype]))
            elif etype == _STRING:
                for _ in range(count):
                    self.take(self.unpack("<Q"))
            else:
                raise EdgespecError(f"{self.path}: unknown metadata array element type {etype}")
            return ArrayInfo(etype, count)
        raise EdgespecError(f"{self.path}: unknown metadata value type {vtype} at byte {self.pos}")


def read_header(path: str | os.PathLike) -> Header:
    """Metadata (long arrays as ArrayInfo) and tensor infos, every length checked against the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    check_gguf(path)
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            cur = _Cursor(view, path)
            try:
                cur.take(4)
                version, n_tensors, n_kv = cur.unpack("<I"), cur.unpack("<Q"), cur.unpack("<Q")
                if n_tensors > MAX_TENSORS or n_kv > size // 13:  # a key-value needs at least 13 bytes
                    raise EdgespecError(f"{path} claims {n_tensors} tensors and {n_kv} metadata keys: corrupt header")
                metadata: dict = {}
                for _ in range(n_kv):
                    key = cur.string()
                    if key in metadata:
                        raise EdgespecError(f"{path}: metadata key {key!r} appears twice")
                    metadata[key] = cur.value(cur.unpack("<I"))
                raw = []
                for _ in range(n_tensors):
                    name, n_dims = cur.string(), cur.unpack("<I")
                    if not 1 <= n_dims <= MAX_DIMS:
                        raise EdgespecError(f"{path}: tensor {name!r} has {n_dims} dimensions")
                    shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
                    raw.append((name, shape, cur.unpack("<I"), cur.unpack("<Q")))
                header_end = cur.pos
            finally:
                view.release()  # before the mmap closes, even when an error's traceback holds `cur`
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise EdgespecError(f"{path}: general.alignment {align!r} is not a power of two")
    data_offset = -(-header_end // align) * align
    tensors = []
    for name, shape, ttype, offset in raw:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise EdgespecError(f"{path}: tensor {name!r} has unknown type {ttype}") from None
        n = math.prod(shape)
        if min(shape) <= 0 or n % block or shape[0] % block:
            raise EdgespecError(f"{path}: tensor {name!r} has an invalid shape {list(shape)} for its type")
        n_bytes = n // block * type_size
        if offset % align or data_offset + offset + n_bytes > size:
            raise EdgespecError(f"{path}: tensor {name!r} lies outside the file or is misaligned (truncated download?)")
        tensors.append(TensorInfo(name, shape, ttype, offset, n_bytes))
    return Header(path, version, metadata, tuple(tensors), data_offset, size)
