"""QuantSpec's self-speculation in the torch backend: a drafter that reads its target's
hierarchical quantized KV cache (kv_quant.py) through the INT4 "upper" view, with the target's
weights: one cache, two precisions, and the drafter keeps no cache of its own for the context.

The drafter's sequence is the target's cached tokens (its *base*) followed by its own tokens
(the pending token and the drafts), whose K/V go to a small *scratch* buffer above the base; it
never writes the target's cache. Whenever the target's tokens change (a verification, a new
prompt), the drafter follows them: its base becomes the target's whole cache and the scratch is
dropped, so it evaluates only the pending token and its drafts at each step. Truncating the
drafter below its base (a caller measuring it, say) is allowed until the target changes again.

Memory: the scratch holds at most `capacity` tokens (default 128: drafts, or a short probe
prompt) at the cache's float precision; a separate drafter backend would hold a whole KV cache
and a second copy of the weights.
"""

from __future__ import annotations

import dataclasses

from edge_spec.backends.kv_quant import QuantKV, dequantize, mixed_attention, quantize
from edge_spec.backends.torch_backend import TorchBackend
from edge_spec.types import EdgespecError

SCRATCH_TOKENS = 128


class SharedKV:
    """The target's INT8 store for slots below `base`, read through `view`; a float scratch for
    slots base..base + capacity (read through the same view once outside the recent window)."""

    def __init__(self, store: QuantKV, view: str, capacity: int):
        torch = self.torch = store.torch
        self.store, self.view, self.recent, self.capacity = store, view, store.recent, capacity
        self.base = 0
        n_layer, n_head_kv, _, half = store.upper[0].shape
        shape = (n_layer, n_head_kv, capacity, 2 * half)
        self.k = torch.zeros(shape, dtype=store.dtype, device=store.ring_slot.device)
        self.v = torch.zeros(shape, dtype=store.dtype, device=store.ring_slot.device)
        self._window = None

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def begin(self, start: int, stop: int, kpos) -> None:
        torch, store = self.torch, self.store
        if stop - self.base > self.capacity:
            raise EdgespecError(f"a shared-cache drafter holds at most {self.capacity} tokens beyond its target's "
                                "cache; draft less, or give it a larger capacity")
        lo = max(start - self.recent, 0)
        below = torch.arange(lo, min(start, self.base), device=store.ring_slot.device)
        have = store.ring_slot[below % store.cap] == below  # the target's ring still holds them
        have = torch.cat((have, torch.ones(stop - max(lo, self.base), dtype=torch.bool, device=have.device)))
        self._window = (lo, below % store.cap, have, kpos)

    def attend(self, il: int, q, k, v, start: int, stop: int, mask, qpos, scale: float):
        torch, store, b = self.torch, self.store, self.base
        lo, ring, have, kpos = self._window
        self.k[il, :, start - b:stop - b] = k.to(self.k.dtype)
        self.v[il, :, start - b:stop - b] = v.to(self.v.dtype)
        full, seen = [], []
        for i, own in enumerate((self.k, self.v)):
            mine = own[il, :, :stop - b]
            full.append(torch.cat((store.ring[i][il].index_select(1, ring), mine[:, max(lo, b) - b:]), dim=1).float())
            seen.append(torch.cat((
                dequantize(torch, store.upper[i][il, :, :b], store.lower[i][il, :, :b], store.scale[i][il, :, :b],
                           self.view),
                dequantize(torch, *quantize(torch, mine), self.view)), dim=1))   # [kv, stop, d]
        return mixed_attention(torch, q, seen[0], seen[1], full[0], full[1], have, lo, stop, mask, qpos, kpos,
                               self.recent, scale)

    def keep(self, src, dst) -> None:
        raise EdgespecError("a shared-cache drafter drafts chains; token trees are its target's to verify")


class SharedCacheDrafter(TorchBackend):
    """A drafter backend on its target's weights and quantized KV cache (see the module
    docstring). Made by `shared_cache_drafter(target)`; closing it leaves the target open."""

    def __init__(self, target: TorchBackend, view: str = "upper", capacity: int | None = None):
        if not isinstance(target.kv, QuantKV):
            raise EdgespecError("a shared-cache drafter needs a target with kv_cache='int8x2'")
        # everything but the cache, the token list and the slot positions is the target's
        state = {k: v for k, v in vars(target).items() if k != "tokens"}
        vars(self).update(state)
        self.target = target
        self.options = dataclasses.replace(target.options, kv_view=view)
        self.kv = SharedKV(target.kv, view, capacity or min(target.options.n_batch, SCRATCH_TOKENS))
        self._slot_pos = target._slot_pos.clone()
        self._own_vocab = False
        self._list: list[int] = []
        self._seen: list[int] | None = None
        self._tree = None
        extra = {**target.facts.extra, "kv_cache": f"int8x2/{view} (its target's cache)"}
        self.facts = dataclasses.replace(target.facts, extra=extra)

    @property
    def tokens(self) -> list[int]:
        """The target's cached tokens up to the base, then this drafter's own."""
        self._follow()
        return self._list

    def _follow(self) -> None:
        t = self.target.tokens
        if t != self._seen:  # the target changed: follow its whole cache, drop the scratch
            self._seen = list(t)
            self._list = list(t)
            self.kv.base = len(t)
            self._slot_pos[:len(t)] = self.target._slot_pos[:len(t)]

    def forward(self, tokens, logits: str = "all"):
        self._check_open()
        self._follow()
        return super().forward(tokens, logits)

    def truncate(self, n_past: int) -> None:
        self._check_open()
        del self.tokens[max(n_past, 0):]
        self.kv.base = min(self.kv.base, len(self._list))

    def forward_tree(self, pending, tree):
        raise EdgespecError("a shared-cache drafter drafts chains; token trees are its target's to verify")

    def close(self) -> None:
        self.w = self.streamer = self.kv = self._vocab = self.target = None  # the target's, left open


def shared_cache_drafter(target: TorchBackend, view: str = "upper", capacity: int | None = None) -> SharedCacheDrafter:
    """QuantSpec's drafter for `target` (a TorchBackend with kv_cache="int8x2")."""
    return SharedCacheDrafter(target, view, capacity)
