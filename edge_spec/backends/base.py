"""What every backend is: one loaded model on one device, and what it can do, as data.

The runtime, the drafters, calibration and the engine talk to a backend only through this
protocol, and tell backends apart only by `capabilities` (never by class or `hasattr`). Only
token ids and host-side numpy arrays cross it, so any drafter can pair with any target whatever
backend or device each runs on.

Shapes: `forward` returns logits [rows, vocab] float32, one row per token asked for ("all"), the
last one ("last") or none ("none"); `forward_tree` returns [len(tree), vocab].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from edge_spec.core.tree import TokenTree
    from edge_spec.types import ModelFacts

KINDS = ("llama", "torch", "onnx")  # llama.cpp, torch, onnxruntime
# weights of the models onnxruntime runs: float32 as exported, or quantized by onnxruntime's own
# tools (backends/onnx_backend.py says how)
ONNX_WEIGHTS = ("float32", "int8", "int8-dynamic")


@dataclass(frozen=True)
class Capabilities:
    kind: str                       # one of KINDS: whose cost model and calibrations apply
    trees: bool                     # forward_tree/keep_path: a token tree verified in one pass
    threads_settable: bool          # set_threads(n) between passes (parallel schedules split cores)
    gpu_layers: int = 0             # blocks on a GPU (llama.cpp's -ngl); 0: computed on the CPU
    disk_bytes: int = 0             # weights read from disk at every pass (a paged target; has evict())
    workers: tuple[str, ...] = ()   # RPC workers holding its gpu_layers (backends/isolated.py)
    tree_growth: bool = False       # extend_tree/end_tree: a tree grown over passes, each node evaluated once


@runtime_checkable
class Backend(Protocol):
    facts: ModelFacts               # name, path, vocabulary, special tokens, chat template
    vocab_size: int
    n_ctx: int
    n_threads: int
    capabilities: Capabilities

    @property
    def n_past(self) -> int: ...    # tokens held in its KV cache

    def forward(self, tokens: Sequence[int], logits: str = "all") -> np.ndarray: ...
        # appends `tokens` after n_past and returns their logits [rows, vocab]

    def truncate(self, n_past: int) -> None: ...
        # exact rollback: forget every token from position n_past on

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]: ...
    def piece(self, token: int) -> bytes: ...
    def token_text(self, token: int) -> str: ...
    def is_eog(self, token: int) -> bool: ...
    def detokenize(self, tokens: Sequence[int]) -> str: ...
    def close(self) -> None: ...


class TreeBackend(Backend, Protocol):
    """A backend whose capabilities.trees is True also has these."""

    def forward_tree(self, pending: int, tree: TokenTree) -> np.ndarray: ...
        # the last `pending` tokens of n_past not yet evaluated, then the tree in one pass
    def keep_path(self, path: Sequence[int]) -> None: ...
        # after verification: keep the tree nodes on `path` (in order), drop the rest


class GrowingTreeBackend(TreeBackend, Protocol):
    """A backend whose capabilities.tree_growth is True also has these (drafters/spectree.py)."""

    def extend_tree(self, tree: TokenTree, nodes: Sequence[int]) -> np.ndarray: ...
        # evaluate `nodes` (and their ancestors not evaluated yet) below the cache's last token,
        # keeping them for later calls; returns [len(nodes), vocab]
    def end_tree(self) -> None: ...
        # free every node extend_tree holds


class ThreadedBackend(Backend, Protocol):
    """A backend whose capabilities.threads_settable is True also has this."""

    def set_threads(self, n: int) -> None: ...
