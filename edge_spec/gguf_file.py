"""Checks on a GGUF file before llama.cpp sees it, so bad input gets a clear one-line error."""

from __future__ import annotations

import os
import struct

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
