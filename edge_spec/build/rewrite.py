"""Writes a changed copy of a GGUF: what the trimmed (trim.py) and layer-skipping (skip.py)
drafters are made with.

Metadata and tensor infos come from our own checked header reader (`edge_spec.models.gguf_file`); tensor
bytes are sliced from a memmap of the source, never decoded, so a quantized tensor is copied as is.
Each metadata value passes through `edit_key` and each tensor through `edit_tensor`; the caller's
provenance keys are added last.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from edge_spec.models.gguf_file import array_values

DROP = object()  # what `edit_key` returns to leave a key out


def _same_key(name: str, value):
    return value


def _same_tensor(info, rows: np.ndarray):
    return info.name, rows


def rewrite(header, out: str | os.PathLike, metadata: dict, *,
            edit_key: Callable = _same_key, edit_tensor: Callable = _same_tensor,
            order: Callable[[str], object] | None = None, progress: Callable[[float], None] | None = None) -> None:
    """Copy the GGUF whose checked header is `header` (gguf_file.validate) to `out`.

    `edit_key(name, value)` returns a key's new value, or DROP; long arrays arrive read (numbers
    as numpy, strings as a list). `edit_tensor(info, rows)` gets a tensor's bytes as
    [rows, bytes per row] (rows = its second dimension, 1 for a vector; a read-only memmap view)
    and returns (name, rows) to write, or None to leave the tensor out; the copy keeps the source's
    tensor order, or sorts them by `order(name)` (a stable sort). `metadata` is added last: str,
    int (uint32), float (float32) or an int numpy array (int32 array)."""
    import gguf
    from gguf import GGUFValueType as T


    md = header.metadata
    writer = gguf.GGUFWriter(out, md["general.architecture"])
    for name, stored in header.value_types.items():
        if name == "general.architecture":
            continue  # GGUFWriter writes it
        vtype, sub = T(stored[0]), (T(stored[1]) if len(stored) > 1 else None)
        value = edit_key(name, array_values(header, name) if sub is not None else md[name])
        if value is DROP:
            continue
        if isinstance(value, np.ndarray):
            value = value.tolist()
        writer.add_key_value(name, value, vtype, sub_type=sub)
    for key, value in metadata.items():
        if isinstance(value, np.ndarray):
            writer.add_key_value(key, [int(v) for v in value], T.ARRAY, sub_type=T.INT32)
        else:
            vtype = T.STRING if isinstance(value, str) else T.FLOAT32 if isinstance(value, float) else T.UINT32
            writer.add_key_value(key, value, vtype)
    raw = np.memmap(header.path, dtype=np.uint8, mode="r")
    copied = []
    for t in header.tensors:
        rows = t.shape[1] if len(t.shape) > 1 else 1
        start = header.data_offset + t.offset
        kept = edit_tensor(t, raw[start: start + t.n_bytes].reshape(rows, -1))
        if kept is not None:
            copied.append((*kept, t))
    if order is not None:
        copied.sort(key=lambda c: order(c[0]))
    parts = []
    for name, data, t in copied:
        shape = (t.shape[0], data.shape[0], *t.shape[2:])[: len(t.shape)]
        writer.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), data.nbytes,
                               gguf.GGMLQuantizationType(t.type))
        parts.append(data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total, done = sum(d.nbytes for d in parts) or 1, 0
    for data in parts:
        writer.write_tensor_data(np.ascontiguousarray(data))
        done += data.nbytes
        if progress:
            progress(done / total)
    writer.close()
