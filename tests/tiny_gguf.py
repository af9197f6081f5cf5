"""Tiny GGUF model files with random weights, for backend tests that need no real model.

`write_llama` writes a real ``llama``-architecture model (RMSNorm, RoPE, GQA attention,
SwiGLU FFN, untied output layer) small enough to write in a few milliseconds and to run
on a CPU in well under a millisecond per token.

Vocabulary (tokenizer model ``"llama"``, i.e. SentencePiece/SPM), ids:

* ``0`` ``<unk>`` (UNKNOWN), ``1`` ``<s>`` (CONTROL), ``2`` ``</s>`` (CONTROL)
* ``3`` ``<unused0>`` (UNUSED) and ``4`` ``"▁"`` (NORMAL); ids 0-4 are never prefixed.
  (Id 3 is ASCII on purpose: llama.cpp logs a 40-byte preview of the token list, and a
  multi-byte character there gets cut mid-sequence, which makes llama-cpp-python's
  default log callback raise UnicodeDecodeError.)
* ``5 .. 5+n_pieces-1``: normal pieces (``"▁the"``, ``"▁a"``, letters, ``"▁"``+letter,
  bigrams, ...), each written as ``token_prefix + piece``
* the next 256 ids: byte tokens ``<0x00>`` .. ``<0xFF>`` (type BYTE), needed by the SPM
  tokenizer for byte fallback and for the newline token
* any remaining ids up to ``vocab_size``: filler pieces ``"▁extra<i>"`` (NORMAL)

So two models with different ``token_prefix`` differ in token text at every id in
``5 .. 5+n_pieces-1`` (and agree on ids 0-4 and on the byte tokens when ``n_pieces`` is the
same).  By default ``n_pieces = vocab_size - 261`` (no fillers); give ``n_pieces``
explicitly to make models whose vocabularies share a common prefix but differ in size.

``bos``/``eos`` only set ``tokenizer.ggml.bos_token_id``/``eos_token_id``; ids 1 and 2
always hold ``<s>``/``</s>``.  Pass ``None`` to leave a key out (llama.cpp then defaults
to 1 and 2 for SPM vocabularies).
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

PathLike = Union[str, "os.PathLike[str]"]

# gguf token types (gguf.TokenType), repeated here so the vocab builder needs no import
TT_NORMAL = 1
TT_UNKNOWN = 2
TT_CONTROL = 3
TT_USER_DEFINED = 4
TT_UNUSED = 5
TT_BYTE = 6

SPM_SPACE = "\u2581"  # "▁"
N_SPECIAL = 3  # <unk>, <s>, </s>
N_FIXED = 5  # ids below this are never prefixed
N_BYTES = 256
MIN_VOCAB = N_FIXED + N_BYTES + 1  # at least one prefixable piece
DEFAULT_VOCAB_SIZE = 320

_WORDS = [
    "the", "a", "and", "of", "to", "in", "is", "it", "that", "for", "on", "with", "as",
    "was", "he", "she", "you", "be", "at", "by", "this", "are", "or", "not", "we", "they",
    "have", "from", "one", "all", "hello", "world",
]
_BIGRAMS = [
    "th", "he", "in", "er", "an", "re", "on", "at", "en", "nd", "ti", "es", "or", "te",
    "of", "ed", "is", "it", "al", "ar", "st", "to", "nt", "ng", "se", "ha", "as", "ou",
    "io", "le", "ve", "co", "me", "de", "hi", "ri", "ro", "ic", "ne", "ea", "ra", "ce",
]


def _base_pieces() -> list[str]:
    """Deterministic, duplicate-free list of normal SPM pieces, most useful first."""
    out: list[str] = []
    seen: set[str] = {SPM_SPACE}

    def add(p: str) -> None:
        if p not in seen:
            seen.add(p)
            out.append(p)

    for w in _WORDS[:8]:
        add(SPM_SPACE + w)
    for c in string.ascii_lowercase:
        add(c)
    for c in string.ascii_lowercase:
        add(SPM_SPACE + c)
    for w in _WORDS[8:]:
        add(SPM_SPACE + w)
    for b in _BIGRAMS:
        add(b)
    for c in string.ascii_uppercase:
        add(c)
    for c in string.digits + ".,!?'\"-:;()":
        add(c)
    for c in string.ascii_uppercase:
        add(SPM_SPACE + c)
    for b in _BIGRAMS:
        add(SPM_SPACE + b)
    for a in string.ascii_lowercase:
        for b in string.ascii_lowercase:
            add(a + b)
    return out


_BASE_PIECES = _base_pieces()


def build_vocab(
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    token_prefix: str = "",
    n_pieces: Optional[int] = None,
) -> tuple[list[str], list[float], list[int]]:
    """Return ``(tokens, scores, token_types)`` for the layout described in the module doc."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {MIN_VOCAB}, got {vocab_size}")
    max_pieces = vocab_size - N_FIXED - N_BYTES
    if n_pieces is None:
        n_pieces = max_pieces
    if not 1 <= n_pieces <= max_pieces:
        raise ValueError(f"n_pieces must be in [1, {max_pieces}] for vocab_size={vocab_size}")
    if n_pieces > len(_BASE_PIECES):
        raise ValueError(f"at most {len(_BASE_PIECES)} pieces available, asked for {n_pieces}")

    tokens: list[str] = ["<unk>", "<s>", "</s>", "<unused0>", SPM_SPACE]
    types: list[int] = [TT_UNKNOWN, TT_CONTROL, TT_CONTROL, TT_UNUSED, TT_NORMAL]
    scores: list[float] = [0.0, 0.0, 0.0, -1000.0, -1.0]

    for i, p in enumerate(_BASE_PIECES[:n_pieces]):
        tokens.append(token_prefix + p)
        types.append(TT_NORMAL)
        scores.append(-float(N_FIXED + i))
    for b in range(N_BYTES):
        tokens.append(f"<0x{b:02X}>")
        types.append(TT_BYTE)
        scores.append(0.0)
    n_extra = vocab_size - len(tokens)
    for i in range(n_extra):
        tokens.append(f"{SPM_SPACE}extra{i}")
        types.append(TT_NORMAL)
        scores.append(-1000.0 - i)

    assert len(tokens) == vocab_size
    if len(set(tokens)) != len(tokens):
        # llama.cpp asserts that token texts are unique
        raise ValueError(f"token_prefix={token_prefix!r} makes token texts collide")
    return tokens, scores, types


def write_llama(
    path: PathLike,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 512,
    seed: int = 0,
    token_prefix: str = "",
    bos: Optional[int] = 1,
    eos: Optional[int] = 2,
    chat_template: Optional[str] = None,
    n_pieces: Optional[int] = None,
    add_bos: bool = True,
    add_eos: bool = False,
    dtype: str = "f32",
    logit_scale: float = 3.0,
    name: str = "tiny-llama",
) -> Path:
    """Write a tiny random llama model to ``path`` and return it as a Path.

    Weights are drawn from N(0, 1/fan_in) (embeddings N(0, 1), norms = 1), so every
    layer contributes and logits depend on context; the output layer is scaled so that
    logits have a standard deviation of about ``logit_scale``.  ``dtype`` is ``"f32"`` or
    ``"f16"`` (matrices only; norm weights stay F32 as llama.cpp expects).
    """
    import gguf  # imported lazily so that importing this module never requires it

    if n_embd % n_head:
        raise ValueError("n_embd must be divisible by n_head")
    if n_head % n_head_kv:
        raise ValueError("n_head must be divisible by n_head_kv")
    if dtype not in ("f32", "f16"):
        raise ValueError("dtype must be 'f32' or 'f16'")
    tokens, scores, types = build_vocab(vocab_size, token_prefix=token_prefix, n_pieces=n_pieces)
    for label, tid in (("bos", bos), ("eos", eos)):
        if tid is not None and not 0 <= tid < vocab_size:
            raise ValueError(f"{label}={tid} outside the vocabulary")

    head_dim = n_embd // n_head
    n_embd_kv = head_dim * n_head_kv
    rng = np.random.default_rng(seed)
    mat_dtype = np.float32 if dtype == "f32" else np.float16

    def mat(rows: int, cols: int, std: float) -> np.ndarray:
        # numpy shape (rows, cols) == ggml ne {cols, rows}
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(mat_dtype)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arch = "llama"
    w = gguf.GGUFWriter(str(path), arch, use_temp_file=False)

    # general
    w.add_string("general.name", name)
    w.add_uint32("general.file_type", 0 if dtype == "f32" else 1)  # ALL_F32 / MOSTLY_F16

    # hyperparameters (llama.attention.layer_norm_rms_epsilon is required by llama.cpp)
    w.add_uint32(f"{arch}.vocab_size", vocab_size)
    w.add_uint32(f"{arch}.context_length", n_ctx_train)
    w.add_uint32(f"{arch}.embedding_length", n_embd)
    w.add_uint32(f"{arch}.block_count", n_layer)
    w.add_uint32(f"{arch}.feed_forward_length", n_ff)
    w.add_uint32(f"{arch}.attention.head_count", n_head)
    w.add_uint32(f"{arch}.attention.head_count_kv", n_head_kv)
    w.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)

    # tokenizer
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", types)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    if bos is not None:
        w.add_uint32("tokenizer.ggml.bos_token_id", bos)
    if eos is not None:
        w.add_uint32("tokenizer.ggml.eos_token_id", eos)
    w.add_bool("tokenizer.ggml.add_bos_token", add_bos)
    w.add_bool("tokenizer.ggml.add_eos_token", add_eos)
    w.add_bool("tokenizer.ggml.add_space_prefix", True)
    if chat_template is not None:
        w.add_string("tokenizer.chat_template", chat_template)

    # tensors
    w.add_tensor("token_embd.weight", mat(vocab_size, n_embd, 1.0))
    s_embd = 1.0 / np.sqrt(n_embd)
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(n_embd))
        w.add_tensor(p + "attn_q.weight", mat(n_embd, n_embd, s_embd))
        w.add_tensor(p + "attn_k.weight", mat(n_embd_kv, n_embd, s_embd))
        w.add_tensor(p + "attn_v.weight", mat(n_embd_kv, n_embd, s_embd))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, n_embd, s_embd))
        w.add_tensor(p + "ffn_norm.weight", ones(n_embd))
        w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd, s_embd))
        w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd, s_embd))
        w.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff, 1.0 / np.sqrt(n_ff)))
    w.add_tensor("output_norm.weight", ones(n_embd))
    w.add_tensor("output.weight", mat(vocab_size, n_embd, logit_scale * s_embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def truncate_copy(src: PathLike, dst: PathLike, keep_bytes: int) -> Path:
    """Copy the first ``keep_bytes`` bytes of ``src`` to ``dst`` (negative: drop that many
    bytes from the end).  Returns ``dst`` as a Path."""
    data = Path(src).read_bytes()
    if keep_bytes < 0:
        keep_bytes = max(0, len(data) + keep_bytes)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[:keep_bytes])
    return dst


def write_not_gguf(path: PathLike, size: int = 4096) -> Path:
    """Write a file that is not GGUF (wrong magic, random-looking body)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = np.random.default_rng(1234).integers(0, 256, size=max(0, size - 16), dtype=np.uint8)
    path.write_bytes(b"NOTGGUF\x00this is not a model\n"[:16] + body.tobytes())
    return path


__all__: Sequence[str] = [
    "build_vocab",
    "write_llama",
    "truncate_copy",
    "write_not_gguf",
    "DEFAULT_VOCAB_SIZE",
    "MIN_VOCAB",
    "N_FIXED",
    "N_BYTES",
]
