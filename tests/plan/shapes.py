"""Model shapes and machines for planner tests, made up (no file is read)."""

from __future__ import annotations

from edge_spec.models.shape import ModelShape
from edge_spec.plan import profile

GiB = 2**30


def shape(name="big", layers=28, layer_bytes=100 << 20, head=200 << 20, embd=200 << 20, vocab=150_000):
    return ModelShape(
        path=f"/m/{name}.gguf", name=name, architecture="qwen2", file_bytes=layers * layer_bytes + head + embd,
        n_layers=layers, n_embd=1536, n_head=12, n_head_kv=2, head_dim_k=128, head_dim_v=128, vocab_size=vocab,
        n_ctx_train=32768, layer_bytes=(layer_bytes,) * layers, output_bytes=head, embedding_bytes=embd,
        other_bytes=0, layer_params=layers * layer_bytes // 2, output_params=head // 2)


def small_machine():
    prof = profile.load("ci-2core")
    return prof.model_copy(update={"ram_available_bytes": 2 * GiB, "gpus": [], "disk_read_gbs": 0.8})
