"""Checks on a GGUF file before llama.cpp sees it, so bad input gets a clear one-line error.

`read_header` (also named `validate`, for the call sites that only check) walks the whole
header, metadata and tensor infos, with every count, length and offset checked against the
file, checks the tensor layout, then the model-level facts (architecture, layer count,
tokenizer arrays, chat-template size). Every failure is an EdgespecError naming the file and
the problem. The planner reads headers through it and the llama.cpp backend calls it before
llama.cpp opens a file, so no file reaches llama.cpp's parser unchecked.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from edge_spec.types import EdgespecError

GGUF_MAGIC = b"GGUF"


def check_gguf(path: str | os.PathLike) -> None:
    """Raise EdgespecError unless `path` is an existing file with GGUF's magic and version 2 or 3.

    The cheap first step of `read_header`/`validate`: it reads 8 bytes.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise EdgespecError(f"no such model file: {path} (give a .gguf path, or run without a model to use the defaults)")
    if not os.path.isfile(path):
        raise EdgespecError(f"{path} is not a file: give the path of a .gguf model")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:  # permission denied, an I/O error: one line, not a traceback
        fix = f"make it readable (chmod a+r {path}) or " if isinstance(e, PermissionError) else ""
        raise EdgespecError(f"cannot read {path}: {e.strerror or e}; {fix}give a model file you can read") from None
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise EdgespecError(f"{path} is not a GGUF file (it does not start with 'GGUF'): convert it with llama.cpp's convert_hf_to_gguf.py")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in (2, 3):
        raise EdgespecError(f"{path} is GGUF version {version}; edgespec reads versions 2 and 3")


# --- reading the header: metadata and tensor infos, without touching tensor data -------------
# gguf.GGUFReader builds numpy arrays of every metadata array (8.5 s for Qwen2.5's 152k-token
# vocabulary here); planning needs sizes and shapes only, so arrays are skipped, not decoded.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY = 4, 5, 6, 7, 8, 9
_INTEGERS = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
_TYPE_NAMES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string", "array",
               "uint64", "int64", "float64"]
SHORT_ARRAY = 64  # arrays up to this length are decoded (per-layer head counts); longer ones skipped

# Caps. Each is far above any real model and low enough that a crafted value cannot make
# llama.cpp (or the planner) allocate or loop without bound.
MAX_TENSORS = 1 << 20  # ~3,000 tensors in the largest MoE models (DeepSeek-V3: 1,025)
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp's gguf reader rejects more
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME is 64 bytes including the terminating NUL
MAX_TENSOR_ELEMENTS = 1 << 40  # largest real tensor: ~4e9 elements (a 256-expert MoE weight)
MAX_ALIGNMENT = 1 << 16  # files use 32 (the default); 64 KiB covers any page size
MAX_BLOCK_COUNT = 1024  # layers: 126 in Llama 3.1 405B; llama.cpp keeps per-layer arrays of this size
MAX_EMBEDDING_LENGTH = 1 << 18  # 16,384 in Llama 3.1 405B; 16x headroom
MAX_CHAT_TEMPLATE_BYTES = 64 * 1024  # real templates are 0.3-20 KiB; Jinja compiles what it is given
INT64_MAX = (1 << 63) - 1  # ggml counts elements and bytes in int64_t / size_t

# The smallest encodings, for sanity checks of the counts against the file size:
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dimension, type, offset


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array that was skipped: its element type, length and where its data starts in
    the file (read numeric ones with `array_values`)."""

    type: int
    count: int
    offset: int = -1


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int  # from the start of the data section
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: str
    version: int
    metadata: dict  # key -> value; arrays longer than SHORT_ARRAY as ArrayInfo
    tensors: tuple[TensorInfo, ...]
    data_offset: int
    file_size: int
    value_types: dict  # key -> GGUF type as stored: (type,), or (ARRAY, element type) for arrays


def _q(text: str) -> str:
    """A key or tensor name quoted for a one-line message, at most ~60 characters of it."""
    return repr(text[:60]) + ("..." if len(text) > 60 else "")


def _type_name(stored: tuple) -> str:
    """(4,) -> 'uint32', (9, 8) -> 'array of string', for messages."""
    return " of ".join(_TYPE_NAMES[t] for t in stored)


class _Cursor:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        if self.pos + n > len(self.buf):
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

    def value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        raise EdgespecError(f"{self.path}: metadata key {_q(key)} has unknown value type {vtype} (byte {self.pos})")

    def array(self, etype: int, count: int, key: str):
        """The array's values (up to SHORT_ARRAY of them) or an ArrayInfo, every length checked."""
        if etype == _ARRAY:
            raise EdgespecError(f"{self.path}: metadata key {_q(key)} is a nested array, which GGUF readers reject")
        if etype not in _SCALARS and etype != _STRING:
            raise EdgespecError(f"{self.path}: metadata array {_q(key)} has unknown element type {etype}")
        least = struct.calcsize(_SCALARS[etype]) if etype in _SCALARS else 8  # a string: its length
        if count > (len(self.buf) - self.pos) // least:
            raise EdgespecError(f"{self.path} is truncated or corrupt: metadata array {_q(key)} claims {count} "
                                f"elements but only {len(self.buf) - self.pos} bytes remain")
        if count <= SHORT_ARRAY:
            return [self.value(etype, key) for _ in range(count)]
        start = self.pos
        if etype in _SCALARS:
            self.take(count * least)
        else:
            for _ in range(count):
                self.take(self.unpack("<Q"))
        return ArrayInfo(etype, count, start)


def read_header(path: str | os.PathLike) -> Header:
    """Metadata (long arrays as ArrayInfo) and tensor infos, after every check edgespec makes.

    The file: magic and version 2 or 3; tensor and key counts against the file size; every
    string and array inside the file; known value types, no nested arrays, no duplicate keys;
    general.alignment a uint32 power of two <= MAX_ALIGNMENT; each tensor's name (unique, short
    enough), 1..MAX_DIMS dimensions each > 0, element count within int64 and MAX_TENSOR_ELEMENTS,
    known ggml type, first dimension a multiple of the type's block size, offset aligned, data
    inside the file and overlapping no other tensor's (so all tensor bytes fit the file).
    The model: see `_check_model`. Takes ~0.15 s for a 150k-token vocabulary.
    """
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
                if n_tensors > MAX_TENSORS:
                    raise EdgespecError(f"{path}: the header claims {n_tensors} tensors; the cap is {MAX_TENSORS}")
                if n_tensors > size // _MIN_TENSOR_INFO_BYTES or n_kv > size // _MIN_KV_BYTES:
                    raise EdgespecError(f"{path} is truncated or corrupt: its header claims {n_tensors} tensors "
                                        f"and {n_kv} metadata keys, more than {size} bytes can hold")
                metadata: dict = {}
                types: dict = {}
                for _ in range(n_kv):
                    key = cur.string()
                    if key in metadata:
                        raise EdgespecError(f"{path}: metadata key {_q(key)} appears twice")
                    vtype = cur.unpack("<I")
                    if vtype == _ARRAY:
                        etype, count = cur.unpack("<I"), cur.unpack("<Q")
                        metadata[key], types[key] = cur.array(etype, count, key), (vtype, etype)
                    else:
                        metadata[key], types[key] = cur.value(vtype, key), (vtype,)
                raw = []
                for _ in range(n_tensors):
                    name, n_dims = cur.string(), cur.unpack("<I")
                    if not 1 <= n_dims <= MAX_DIMS:
                        raise EdgespecError(f"{path}: tensor {_q(name)} has {n_dims} dimensions; "
                                            f"ggml allows 1 to {MAX_DIMS}")
                    shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
                    raw.append((name, shape, cur.unpack("<I"), cur.unpack("<Q")))
                header_end = cur.pos
            finally:
                view.release()  # before the mmap closes, even when an error's traceback holds `cur`
    align = metadata.get("general.alignment", 32)
    if "general.alignment" in types and types["general.alignment"] != (_UINT32,):
        # llama.cpp reads it with gguf_get_val_u32, which aborts the process on any other type
        raise EdgespecError(f"{path}: general.alignment must be a uint32, found {_type_name(types['general.alignment'])}")
    if align <= 0 or align & (align - 1) or align > MAX_ALIGNMENT:
        raise EdgespecError(f"{path}: general.alignment {align} is not a power of two up to {MAX_ALIGNMENT}")
    data_offset = -(-header_end // align) * align
    tensors, names = [], set()
    for name, shape, ttype, offset in raw:
        if name in names:
            raise EdgespecError(f"{path}: tensor name {_q(name)} appears twice")
        names.add(name)
        if len(name.encode("utf-8")) > MAX_TENSOR_NAME_BYTES:
            raise EdgespecError(f"{path}: tensor name {_q(name)} is longer than {MAX_TENSOR_NAME_BYTES} bytes")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise EdgespecError(f"{path}: tensor {_q(name)} has unknown ggml type {ttype}") from None
        if min(shape) <= 0:
            raise EdgespecError(f"{path}: tensor {_q(name)} has a zero dimension: shape {list(shape)}")
        n = math.prod(shape)
        if n > INT64_MAX:
            raise EdgespecError(f"{path}: tensor {_q(name)} has shape {list(shape)}, whose element count overflows 64 bits")
        if n > MAX_TENSOR_ELEMENTS:
            raise EdgespecError(f"{path}: tensor {_q(name)} has {n} elements, more than the cap of {MAX_TENSOR_ELEMENTS}")
        if shape[0] % block:
            raise EdgespecError(f"{path}: tensor {_q(name)} has rows of {shape[0]} elements, "
                                f"not a multiple of its type's block size {block}")
        n_bytes = n // block * type_size
        if offset % align:
            raise EdgespecError(f"{path}: tensor {_q(name)} has offset {offset}, not a multiple of the alignment {align}")
        if data_offset + offset + n_bytes > size:
            raise EdgespecError(f"{path}: tensor {_q(name)} (bytes {data_offset + offset}..{data_offset + offset + n_bytes}) "
                                f"lies outside the file, which ends at {size} (truncated download?)")
        tensors.append(TensorInfo(name, shape, ttype, offset, n_bytes))
    by_offset = sorted(tensors, key=lambda t: t.offset)
    for a, b in itertools.pairwise(by_offset):
        if b.offset < a.offset + a.n_bytes:
            raise EdgespecError(f"{path}: tensors {_q(a.name)} and {_q(b.name)} overlap "
                                f"(offsets {a.offset} + {a.n_bytes} bytes and {b.offset})")
    header = Header(path, version, metadata, tuple(tensors), data_offset, size, types)
    _check_model(header)
    return header


def array_values(header: Header, key: str) -> np.ndarray | list[str]:
    """A metadata array's values, long ones read from the file (read_header skips them): numbers
    as a numpy array, strings as a list."""
    value = header.metadata.get(key)
    if value is None:
        raise EdgespecError(f"{header.path}: no metadata key {_q(key)}")
    if not isinstance(value, ArrayInfo):
        return list(value) if header.value_types[key][-1] == _STRING else np.asarray(value)
    if value.type in _SCALARS:
        return np.fromfile(header.path, dtype=np.dtype(_SCALARS[value.type]), count=value.count, offset=value.offset)
    with open(header.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        out, pos = [], value.offset  # read_header checked every length
        for _ in range(value.count):
            n = int.from_bytes(mm[pos:pos + 8], "little")
            out.append(mm[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
            pos += 8 + n
        return out


validate = read_header  # the name for call sites that check a file before llama.cpp opens it


# --- model-level checks -----------------------------------------------------------------------

def _check_model(h: Header) -> None:
    """The model-level checks, after the file's structure is known to be sound.

    general.architecture a string; {arch}.block_count an integer in 1..MAX_BLOCK_COUNT and
    {arch}.embedding_length in 1..MAX_EMBEDDING_LENGTH; tokenizer.ggml.tokens a non-empty
    array of strings, with tokenizer.ggml.scores (float32) and tokenizer.ggml.token_type (int32),
    where present, of the same length; bos/eos token ids, where present, integers inside the
    vocabulary; chat templates strings of at most MAX_CHAT_TEMPLATE_BYTES.
    """
    md, types, where = h.metadata, h.value_types, h.path

    def integer(key: str, lo: int, hi: int) -> None:
        if key not in md:
            raise EdgespecError(f"{where}: the GGUF metadata has no {key}")
        if types[key][0] not in _INTEGERS:
            raise EdgespecError(f"{where}: {key} must be an integer, found {_type_name(types[key])}")
        if not lo <= md[key] <= hi:
            raise EdgespecError(f"{where}: {key} is {md[key]}; it must be in {lo}..{hi}")

    def array_of(key: str, etype: int, label: str) -> int:
        if types[key] != (_ARRAY, etype):
            raise EdgespecError(f"{where}: {key} must be an array of {label}, found {_type_name(types[key])}")
        value = md[key]
        return value.count if isinstance(value, ArrayInfo) else len(value)

    arch = md.get("general.architecture")
    if types.get("general.architecture") != (_STRING,) or not arch:
        raise EdgespecError(f"{where}: general.architecture is missing or not a string")
    integer(f"{arch}.block_count", 1, MAX_BLOCK_COUNT)
    integer(f"{arch}.embedding_length", 1, MAX_EMBEDDING_LENGTH)
    if "tokenizer.ggml.tokens" not in md:
        raise EdgespecError(f"{where}: the GGUF metadata has no tokenizer.ggml.tokens (a vocabulary is needed)")
    n_vocab = array_of("tokenizer.ggml.tokens", _STRING, "strings")
    if n_vocab == 0:
        raise EdgespecError(f"{where}: tokenizer.ggml.tokens is empty")
    for key, etype, label in (("tokenizer.ggml.scores", _FLOAT32, "float32"),
                              ("tokenizer.ggml.token_type", _INT32, "int32")):  # as llama.cpp reads them
        if key in md and (n := array_of(key, etype, label)) != n_vocab:
            raise EdgespecError(f"{where}: {key} has {n} entries but tokenizer.ggml.tokens has {n_vocab}")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        if key in md:
            integer(key, 0, n_vocab - 1)
    for key, value in md.items():
        if key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template."):
            if types[key] != (_STRING,):
                raise EdgespecError(f"{where}: {key} must be a string, found {_type_name(types[key])}")
            if (n := len(value.encode("utf-8"))) > MAX_CHAT_TEMPLATE_BYTES:
                raise EdgespecError(f"{where}: {key} is {n} bytes; the cap is {MAX_CHAT_TEMPLATE_BYTES}")
