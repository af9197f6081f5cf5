"""A GGUF model's shape: what planning needs to know of it, read from its header alone."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

from edge_spec.models.gguf_file import ArrayInfo, check_gguf, read_header
from edge_spec.types import EdgespecError

# bytes per cached K or V element, by llama.cpp cache type
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
            "q4_1": 20 / 32, "q4_0": 18 / 32}


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know about a GGUF model, read from its header only."""

    path: str
    name: str
    architecture: str
    file_bytes: int
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    vocab_size: int
    n_ctx_train: int
    layer_bytes: tuple[int, ...]   # weights of each block
    output_bytes: int              # the LM head (token_embd when tied): read at every pass
    embedding_bytes: int           # token_embd: only looked up, not streamed (unless tied)
    other_bytes: int               # norms and anything outside the blocks
    layer_params: int              # parameters in all blocks (matmul work per token)
    output_params: int

    @property
    def weight_bytes(self) -> int:
        return sum(self.layer_bytes) + self.output_bytes + self.embedding_bytes + self.other_bytes

    @property
    def n_params(self) -> int:
        return self.layer_params + self.output_params

    def kv_bytes_per_token(self, type_k: str = "f16", type_v: str = "f16", layers: int | None = None) -> float:
        n = self.n_layers if layers is None else layers
        return n * self.n_head_kv * (self.head_dim_k * KV_BYTES[type_k] + self.head_dim_v * KV_BYTES[type_v])

    def compute_buffer_bytes(self, n_ubatch: int = 512) -> int:
        """llama.cpp's compute buffer: dominated by the logits of a full batch (measured 300 MiB
        for Qwen2.5-1.5B at n_ubatch 512; this gives 311 MB + activations)."""
        return n_ubatch * (self.vocab_size + 4 * self.n_embd) * 4


@lru_cache(maxsize=32)
def _shape_cached(path: str, size: int, mtime: float) -> ModelShape:
    return shape_from_header(path, read_header(path))


def shape_from_header(path: str, h) -> ModelShape:
    """The shape of the model whose validated GGUF header (gguf_file.Header) is `h`."""
    md = h.metadata
    arch = md.get("general.architecture")
    if not isinstance(arch, str):
        raise EdgespecError(f"{path}: no general.architecture in the GGUF metadata")

    def num(key: str, default=None) -> int:
        v = md.get(f"{arch}.{key}", default)
        if isinstance(v, list):  # per-layer values (e.g. head_count_kv of hybrid models): the largest
            v = max(v) if v else default
        if not isinstance(v, (int, float)) or v is None:
            if default is None:
                raise EdgespecError(f"{path}: the GGUF metadata has no {arch}.{key}; cannot plan for it")
            v = default
        return int(v)

    n_layers, n_embd, n_head = num("block_count"), num("embedding_length"), num("attention.head_count")
    n_head_kv = num("attention.head_count_kv", n_head)
    head_dim = n_embd // max(n_head, 1)
    layer_bytes = [0] * n_layers
    layer_params = output_params = output_bytes = embedding_bytes = other_bytes = 0
    embedding = None
    for t in h.tensors:
        if t.name.startswith("blk."):
            i = int(t.name.split(".")[1])
            if 0 <= i < n_layers:
                layer_bytes[i] += t.n_bytes
                layer_params += t.n_elements if len(t.shape) > 1 else 0
                continue
        if t.name == "output.weight":
            output_bytes, output_params = t.n_bytes, t.n_elements
        elif t.name == "token_embd.weight":
            embedding = t
        else:
            other_bytes += t.n_bytes
    if embedding is not None:
        if output_bytes == 0:  # tied embeddings: the embedding matrix is the LM head, read every pass
            output_bytes, output_params = embedding.n_bytes, embedding.n_elements
        else:
            embedding_bytes = embedding.n_bytes
    tokens = md.get("tokenizer.ggml.tokens")
    vocab = tokens.count if isinstance(tokens, ArrayInfo) else len(tokens or []) or num("vocab_size", 0)
    name = md.get("general.name") if isinstance(md.get("general.name"), str) else os.path.basename(path)
    return ModelShape(
        path=path, name=name, architecture=arch, file_bytes=h.file_size, n_layers=n_layers, n_embd=n_embd,
        n_head=n_head, n_head_kv=n_head_kv, head_dim_k=num("attention.key_length", head_dim),
        head_dim_v=num("attention.value_length", head_dim), vocab_size=vocab,
        n_ctx_train=num("context_length", 0), layer_bytes=tuple(layer_bytes), output_bytes=output_bytes,
        embedding_bytes=embedding_bytes, other_bytes=other_bytes, layer_params=layer_params,
        output_params=output_params)


def model_shape(path: str | os.PathLike) -> ModelShape:
    """The shape of a GGUF model (cached per file version; reading takes ~0.2 s)."""
    path = os.path.realpath(os.fspath(path))
    try:
        st = os.stat(path)
    except OSError:
        check_gguf(path)  # raises the usual clear error
        raise
    return _shape_cached(path, st.st_size, st.st_mtime)
