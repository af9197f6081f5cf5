"""Hierarchical quantized KV cache (QuantSpec): one INT8 store read at two precisions.

Each key and value vector (one token, one KV head) is quantized symmetrically to INT8,
q = round(x / s) with s = max|x| / 127 (a float16 scale per token and head), and q is split into
two 4-bit planes, q = 16 u + l: the *upper* nibble u (signed, floor(q / 16), -8..7) and the
*lower* nibble l (0..15), each plane packed two values per byte. Views:

    "full"  (the target's):  x ≈ s q                 |error| <= s / 2  (~ max|x| / 254)
    "upper" (a drafter's):   x ≈ s (16 u + 7.5)      |error| <= 8 s    (~ max|x| / 16)

so an INT4 drafter and an INT8 target read the same bytes: 1 byte per element plus 2 per vector
for the scale (f32: 4 bytes per element).

Recent tokens in full precision: a token reads itself and the R tokens before it (by position,
R = `recent`) at the cache's float precision and older ones through its view; quantization
error then only touches distant context, where QuantSpec measured it to matter least. The rule
is per query, so logits do not depend on how tokens were batched. Full-precision values are
kept in a ring of R + `rollback` slots: every rollback (truncate, or a tree's keep_path) of up
to `rollback` tokens finds them there, so it is exact; after a deeper one, the lost slots are
read through the view like older tokens (known per slot, so never wrong, only less precise).
Every token is also quantized when written, so moving between the ring and the store is free.
"""

from __future__ import annotations

from edge_spec.types import EdgespecError

VIEWS = ("full", "upper")
MIN_SCALE = 2.0**-14  # float16's smallest normal: smaller vectors are ~0 at this precision


def quantize(torch, x):
    """x [..., d] (d even) → (upper [..., d/2] uint8, lower [..., d/2] uint8, scale [...] f16)."""
    amax = x.float().abs().amax(-1)
    scale = (amax / 127).clamp_min(MIN_SCALE).to(torch.float16)
    q = (x.float() / scale.float()[..., None]).round_().clamp_(-128, 127).to(torch.int16)
    upper, lower = (q >> 4) & 15, q & 15  # q = 16 * (q >> 4) + (q & 15); u as a 4-bit two's complement
    return _pack(torch, upper), _pack(torch, lower), scale


def dequantize(torch, upper, lower, scale, view: str = "full"):
    """The vectors as `view` reads them: [..., d] float32."""
    u = _unpack(torch, upper)
    u = u - 16 * (u >= 8).to(u.dtype)   # signed nibble, -8..7
    if view == "upper":
        q = u.float() * 16 + 7.5        # the middle of the 16 INT8 values the nibble stands for
    else:
        q = (u * 16 + _unpack(torch, lower)).float()
    return q * scale.float()[..., None]


def _pack(torch, nibbles):
    nibbles = nibbles.to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _unpack(torch, packed):
    p = packed.to(torch.int16)
    return torch.stack((p & 15, p >> 4), dim=-1).flatten(-2)


def mixed_attention(torch, q, keys, values, full_k, full_v, have, lo: int, stop: int, mask, qpos, kpos,
                    recent: int, scale: float):
    """Attention of q [kv, G * n, d] over slots 0..stop: keys/values [kv, stop, d] as the view
    reads them, except that a query at position p reads slot j of the window lo..stop from
    full_k/full_v [kv, stop - lo, d] when that slot has its full-precision value (have [stop - lo])
    and kpos[j] >= p - recent: itself and the `recent` tokens before it."""
    scores = (q @ keys.transpose(1, 2)) * scale + mask                        # [kv, G * n, stop]
    use = have[None, :] & (kpos[lo:stop][None, :] >= qpos[:, None] - recent)  # [G * n, W]
    near = (q @ full_k.transpose(1, 2)) * scale + mask[:, lo:stop]
    scores[..., lo:stop] = torch.where(use, near, scores[..., lo:stop])
    p = torch.softmax(scores, dim=-1)
    p_full = p[..., lo:stop] * use
    p[..., lo:stop] = p[..., lo:stop].masked_fill(use, 0.0)
    return p @ values + p_full @ full_v                                       # [kv, G * n, d]


class QuantKV:
    """K and V of every layer: the INT8 store for all n_ctx slots, and a ring of full-precision
    values for the last R + rollback slots written. Slots are the backend's cache slots (a
    token's slot equals its position except inside a tree pass)."""

    def __init__(self, torch, n_layer: int, n_head_kv: int, n_ctx: int, head_dim: int, device, dtype,
                 view: str = "full", recent: int = 32, rollback: int = 64):
        if view not in VIEWS:
            raise EdgespecError(f"unknown KV view {view!r}: use one of {', '.join(VIEWS)}")
        if head_dim % 2:
            raise EdgespecError("the quantized KV cache needs an even head dimension; use kv_cache='plain'")
        if recent < 0 or rollback < 0:
            raise EdgespecError("kv_recent and kv_rollback must be >= 0")
        self.torch, self.view, self.recent, self.dtype = torch, view, recent, dtype
        self.cap = max(recent + rollback, 1)  # ring capacity
        packed = (n_layer, n_head_kv, n_ctx, head_dim // 2)
        u8 = dict(dtype=torch.uint8, device=device)
        self.upper = [torch.zeros(packed, **u8) for _ in "kv"]   # K, V
        self.lower = [torch.zeros(packed, **u8) for _ in "kv"]
        self.scale = [torch.zeros(packed[:3], dtype=torch.float16, device=device) for _ in "kv"]
        ring = (n_layer, n_head_kv, self.cap, head_dim)
        self.ring = [torch.zeros(ring, dtype=dtype, device=device) for _ in "kv"]
        self.ring_slot = torch.full((self.cap,), -1, dtype=torch.long, device=device)  # slot held, -1: none
        self._window = None

    # --- accounting --------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """The store's bytes per token (all layers, K and V): planes and scales."""
        return sum((u.element_size() * u[:, :, 0].numel() * 2 + s[:, :, 0].numel() * s.element_size())
                   for u, s in zip(self.upper, self.scale))

    @property
    def nbytes(self) -> int:
        tensors = [*self.upper, *self.lower, *self.scale, *self.ring]
        return sum(t.numel() * t.element_size() for t in tensors)

    # --- a pass --------------------------------------------------------------------------------
    def begin(self, start: int, stop: int, kpos) -> None:
        """Before a pass writing slots start..stop: which earlier slots of the recent window
        still have their full-precision values (checked before the pass overwrites the ring)."""
        torch = self.torch
        lo = max(start - self.recent, 0)
        old = torch.arange(lo, start, device=self.ring_slot.device)
        have_old = self.ring_slot[old % self.cap] == old
        new = torch.arange(max(start, stop - self.cap), stop, device=self.ring_slot.device)
        self.ring_slot[new % self.cap] = new
        self._window = (lo, old % self.cap, torch.cat((have_old, torch.ones(stop - start, dtype=torch.bool,
                                                                             device=have_old.device))), kpos)

    def attend(self, il: int, q, k, v, start: int, stop: int, mask, qpos, scale: float):
        """Attention of queries q [kv, G * n, d] (query positions qpos [G * n]) over slots
        0..stop after writing k, v [kv, n, d] at start..stop; mask [G * n, stop] additive."""
        torch = self.torch
        lo, old, have, kpos = self._window
        # [kv, W, d]: at the ring's precision, so a token reads the same values in later passes
        full_k = torch.cat((self.ring[0][il].index_select(1, old), k.to(self.dtype)), dim=1).float()
        full_v = torch.cat((self.ring[1][il].index_select(1, old), v.to(self.dtype)), dim=1).float()
        self._write(il, start, stop, k, v)
        keys = dequantize(torch, self.upper[0][il, :, :stop], self.lower[0][il, :, :stop], self.scale[0][il, :, :stop],
                          self.view)                                          # [kv, stop, d]
        values = dequantize(torch, self.upper[1][il, :, :stop], self.lower[1][il, :, :stop],
                            self.scale[1][il, :, :stop], self.view)
        return mixed_attention(torch, q, keys, values, full_k, full_v, have, lo, stop, mask, qpos, kpos,
                               self.recent, scale)

    def _write(self, il: int, start: int, stop: int, k, v) -> None:
        for i, x in enumerate((k, v)):
            self.upper[i][il, :, start:stop], self.lower[i][il, :, start:stop], self.scale[i][il, :, start:stop] = \
                quantize(self.torch, x)
            tail = max(start, stop - self.cap)
            idx = self.torch.arange(tail, stop, device=x.device) % self.cap
            self.ring[i][il].index_copy_(1, idx, x[:, tail - start:].to(self.dtype))

    # --- rollback ------------------------------------------------------------------------------
    def keep(self, src, dst) -> None:
        """Move slots src (a tensor of slot indices) to dst (a slice, below them): a tree's
        accepted branch into place."""
        torch = self.torch
        for planes in (self.upper, self.lower, self.scale):
            for t in planes:
                t[:, :, dst] = t.index_select(2, src)
        held = self.ring_slot[src % self.cap] == src
        rows = [r.index_select(2, src % self.cap) for r in self.ring]
        dst_idx = torch.arange(dst.start, dst.stop, device=src.device)
        for r, row in zip(self.ring, rows):
            r[:, :, dst_idx % self.cap] = row
        self.ring_slot[dst_idx % self.cap] = torch.where(held, dst_idx, torch.full_like(dst_idx, -1))
