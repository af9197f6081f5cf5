"""What every backend is: one loaded model on one device, and what it can do, as data.

The runtime, the drafters, calibration and the engine talk to a backend only through this
protocol, and tell backends apart only by `capabilities` (never by class or `hasattr`). Only
token ids and host-side numpy arrays cross it, so any drafter can pair with any target whatever
backend or device each runs on.

Shapes: `forward` returns logits [rows, vocab] float32, one row per token asked for ("all"), the
last one ("last") or none ("none"); `forward_tree` returns [1 + len(tree), vocab]; `extend_tree`
returns [len(nodes), vocab].

What a backend has beyond `Backend`, by its capabilities (edge_spec.types.Capabilities):
- trees: `forward_tree(pending, tree)` and `keep_path(path)`;
- tree_growth: `extend_tree(tree, nodes)` and `end_tree()`;
- threads_settable: `set_threads(n)`;
- disk_bytes > 0: `evict()` (a paged target);
- siblings: `sibling()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from edge_spec.core.tree import TokenTree
    from edge_spec.types import Capabilities, ModelFacts


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
        # one pass over the pending token (appended after n_past) and the tree below it, each
        # node attending to the context and its ancestors only: logits [1 + len(tree), vocab],
        # after the pending token, then after each node
    def keep_path(self, path: Sequence[int]) -> None: ...
        # after forward_tree: keep the nodes on `path` (root's child first) after the pending
        # token, drop the rest
