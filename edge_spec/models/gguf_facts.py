"""What a local GGUF file is, from its header alone, cached per file version.

`facts(path)` reads the header once with `gguf_file.read_header` (every check the project makes)
and keeps the few facts listing models and searching for drafters need: architecture,
quantization, layer count and a fingerprint of the vocabulary. The cache
($EDGESPEC_STATE/gguf-facts.json) is keyed by the resolved path, size and modification time, so a
second scan of hundreds of files reads no header at all.

The vocabulary fingerprint hashes the token strings' bytes in blocks of VOCAB_BLOCK ids (the
first block starts at FIRST_CHECKED: converters number the first special tokens
differently). Two files can draft for each other when their tokenizer type and BOS/EOS ids
agree, their sizes are within SIZE_SLACK and every block both hold whole is the same:
the header-only form of `vocab.check_compatible`, which still runs when a drafter is loaded.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_spec.models.gguf_file import ArrayInfo, read_header
from edge_spec.models.registry import state_dir
from edge_spec.types import EdgespecError

SIZE_SLACK = 128   # vocabularies padded to a multiple of 64/128 differ only in unused tail ids
FIRST_CHECKED = 5  # ids below this are special tokens that converters number differently

SCHEMA = 1
VOCAB_BLOCK = 4096  # token ids per fingerprint block


@dataclass(frozen=True)
class Vocab:
    model: str          # tokenizer.ggml.model: "gpt2", "llama", ...
    size: int
    bos: int
    eos: int
    blocks: tuple[str, ...]  # hash of ids [FIRST_CHECKED, VOCAB_BLOCK), [VOCAB_BLOCK, 2 * VOCAB_BLOCK), ...; the last may be partial


@dataclass(frozen=True)
class Facts:
    path: str           # resolved (a symlink's target)
    size: int
    architecture: str
    quantization: str   # "Q4_K_M", "F16", ... or "?" when the header does not say
    n_layers: int
    name: str           # general.name, or ""
    vocab: Vocab


def facts(path: str | os.PathLike, cache: dict | None = None) -> Facts:
    """The file's facts, from `cache` (a dict from `load_cache`) when the file is unchanged;
    EdgespecError when the file is not a sound GGUF model."""
    real = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(real)
    except OSError as e:
        raise EdgespecError(f"{path}: cannot read it ({e.strerror or e})") from None
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    if cache is not None and (hit := cache.get(key)) is not None:
        return _from_json(hit)
    found = _read(real, st.st_size)
    if cache is not None:
        cache[key] = asdict(found)
    return found


def _read(path: str, size: int) -> Facts:
    header = read_header(path)
    md = header.metadata
    arch = md["general.architecture"]
    return Facts(path=path, size=size, architecture=arch, quantization=_quantization(md, header.tensors),
                 n_layers=int(md[f"{arch}.block_count"]), name=str(md.get("general.name") or ""),
                 vocab=_vocab(header))


def _quantization(md: dict, tensors) -> str:
    """general.file_type by llama.cpp's name for it, else the most common 2-D tensor type."""
    from gguf.constants import GGMLQuantizationType, LlamaFileType

    file_type = md.get("general.file_type")
    if isinstance(file_type, int):
        try:
            return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    counts: dict[int, int] = {}
    for t in tensors:
        if len(t.shape) == 2:
            counts[t.type] = counts.get(t.type, 0) + t.n_elements
    if not counts:
        return "?"
    try:
        return GGMLQuantizationType(max(counts, key=counts.get)).name
    except ValueError:
        return "?"


def _vocab(header) -> Vocab:
    md = header.metadata
    tokens = md["tokenizer.ggml.tokens"]
    if isinstance(tokens, ArrayInfo):
        count, blocks = tokens.count, _file_blocks(header.path, tokens.offset, tokens.count)
    else:  # a short vocabulary (test models): the same bytes as in the file, length-prefixed
        count = len(tokens)
        blocks = _blocks(lambda a, b: b"".join(_encoded(t) for t in tokens[a:b]), count)
    return Vocab(model=str(md.get("tokenizer.ggml.model", "")), size=count,
                 bos=int(md.get("tokenizer.ggml.bos_token_id", -1)),
                 eos=int(md.get("tokenizer.ggml.eos_token_id", -1)), blocks=blocks)


def _encoded(token: str) -> bytes:
    raw = token.encode("utf-8")
    return len(raw).to_bytes(8, "little") + raw


def _file_blocks(path: str, offset: int, count: int) -> tuple[str, ...]:
    """Block hashes of a long string array, straight from the file's bytes (read_header checked
    every length)."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        at, pos = {}, offset  # byte offset of each block boundary's token
        for i in range(count):
            if i == FIRST_CHECKED or i % VOCAB_BLOCK == 0:
                at[i] = pos
            pos += 8 + int.from_bytes(mm[pos:pos + 8], "little")
        at[count] = pos
        return _blocks(lambda a, b: mm[at[a]:at[b]], count)


def _blocks(span, count: int) -> tuple[str, ...]:
    """Hashes of ids [FIRST_CHECKED, VOCAB_BLOCK), [VOCAB_BLOCK, 2 * VOCAB_BLOCK), ... up to count;
    span(a, b) is the bytes of ids a..b-1."""
    bounds = [(max(FIRST_CHECKED, i * VOCAB_BLOCK), min(count, (i + 1) * VOCAB_BLOCK))
              for i in range(-(-count // VOCAB_BLOCK))]
    return tuple(hashlib.blake2b(span(a, b), digest_size=8).hexdigest() for a, b in bounds if a < b)


def vocab_problem(target: Vocab, drafter: Vocab) -> str | None:
    """Why the drafter's token ids would not mean the target's strings, or None when they do."""
    if target.model != drafter.model:
        return f"tokenizer {drafter.model or '?'}, the target's is {target.model or '?'}"
    if (target.bos, target.eos) != (drafter.bos, drafter.eos):
        return f"BOS/EOS ids {drafter.bos}/{drafter.eos}, the target's are {target.bos}/{target.eos}"
    if abs(target.size - drafter.size) > SIZE_SLACK:
        return f"{drafter.size:,} tokens, the target has {target.size:,}"
    smaller = min(target.size, drafter.size)
    whole = len(target.blocks) if target.size == drafter.size else smaller // VOCAB_BLOCK  # blocks both hold whole
    for i in range(whole):
        if target.blocks[i] != drafter.blocks[i]:
            first = max(FIRST_CHECKED, i * VOCAB_BLOCK)
            return f"different token strings among ids {first}..{min(smaller, (i + 1) * VOCAB_BLOCK) - 1}"
    return None


# --- the cache ----------------------------------------------------------------------------------

def cache_file() -> Path:
    return state_dir() / "gguf-facts.json"


def load_cache() -> dict:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data.get("facts", {}) if isinstance(data, dict) and data.get("schema") == SCHEMA else {}


def save_cache(cache: dict) -> None:
    """Write the cache atomically; a read-only state folder only costs the next scan its time."""
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"schema": SCHEMA, "facts": cache}))
        os.replace(tmp, path)
    except OSError:
        pass


def _from_json(d: dict) -> Facts:
    v = d["vocab"]
    return Facts(**(d | {"vocab": Vocab(**(v | {"blocks": tuple(v["blocks"])}))}))
