"""GGUF models run by a transformer written in torch (CPU, or CUDA when asked and present).

Same interface as `LlamaCppBackend` (tokens / n_past / n_ctx / vocab_size / n_threads / facts,
forward, forward_tree + keep_path, truncate, the vocabulary methods, close), so the runtime and
the drafters take either, and a torch drafter can draft for a llama.cpp target or the reverse.

Weights. The GGUF is read with edgespec's own header reader (validated, fast) and each tensor's
bytes are dequantized by `gguf.quants.dequantize` (any GGML type the `gguf` package knows: F32,
F16, BF16, Q4_0..Q8_0, the K-quants, the IQ types) into float32, then kept in memory as float32
or, with `dtype="bfloat16"`, bfloat16. The one weight kept quantized is an untied token
embedding table: its rows are dequantized on lookup (it is read a few rows per step, and at
Qwen2.5's 152k-token vocabulary it is the largest tensor). Keeping every matrix quantized would
need a quantized matmul torch does not have for GGML's block formats: either repacking into a
format torch kernels take (torch.ao int8 dynamic quantization on CPU, or int4 `_weight_int4pack_mm`
on CUDA; both need a requantization, so logits would drift further from llama.cpp's) or custom
kernels that read GGML blocks directly (as llama.cpp's own are).

Architectures: `llama` (SmolLM2; also llama3's `rope_freqs` and linear RoPE scaling, untested
here), `qwen2` (q/k/v biases, tied or untied output) and `gemma3` (q/k norms, sandwich norms,
GELU, every 6th layer global and the others on a sliding window with their own RoPE base; the
window only matters past 512 tokens, which the tests do not reach). RoPE: llama.cpp's converter permutes the Q/K rows of `llama` models so that rotary
pairs are adjacent (LLAMA_ROPE_TYPE_NORM, pairs (2i, 2i+1)); `qwen2` and `gemma3` keep
Hugging Face's layout (LLAMA_ROPE_TYPE_NEOX, pairs (i, i + d/2)).

Numerics: llama.cpp's CPU kernels multiply quantized weights by activations they quantize to
8 bits (Q8_0/Q8_1 blocks of 32, Q8_K blocks of 256) and its flash attention accumulates V in F16;
this backend multiplies the same dequantized weights by float32 activations, so logits differ by
that quantization noise (tests/test_torch_backend.py measures it). Emulating llama.cpp's
activation rounding was tried: it makes one layer agree to 1e-6, but through a deep model the
rounding is chaotic (a 1e-6 float difference flips a Q8 rounding, which flips others), so over
30 layers it agreed no better than float32 and was dropped.

Tokenizer: borrowed from llama.cpp, loaded with `vocab_only` (no weights, no context): token ids,
texts, pieces and special-token handling are then llama.cpp's own, so a torch drafter passes
`check_compatible` with a llama.cpp target of the same family by construction, and prompts
tokenize identically on both backends. Any object with the same methods (`LlamaVocab`'s) can be
passed as `vocab=` instead.

KV cache: preallocated [layers, kv heads, n_ctx, head dim] per K and V, keys stored after RoPE,
so rollback is `truncate` (the cache slots past n_past are simply ignored and overwritten).
Token trees run in one pass with an explicit attention mask; `keep_path` moves the accepted
branch's K/V rows into place (RoPE positions equal their final slots, so nothing is recomputed).
With `kv_cache="int8x2"` the cache is QuantSpec's hierarchical INT8 = two INT4 planes
(backends/kv_quant.py), read through `kv_view` "full" (INT8, a target) or "upper" (INT4, a
drafter), the last `kv_recent` tokens in full precision.

Offloading (SpecExec): with `device_budget_bytes`, only that much of the transformer layers'
weights stays on the device; the rest is streamed from host memory at every pass
(backends/offload.py). Each pass reads every streamed layer once, whatever its token count.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from edge_spec.backends.common import BorrowedVocab, Closing
from edge_spec.backends.kv_quant import VIEWS, QuantKV
from edge_spec.backends.llama_cpp import LlamaVocab
from edge_spec.backends.offload import LayerStreamer
from edge_spec.core.tree import TokenTree
from edge_spec.defaults import N_CTX
from edge_spec.models.gguf_file import read_header
from edge_spec.models.modelfile import ModelFile
from edge_spec.types import Capabilities, EdgespecError, ModelFacts

ARCHITECTURES = ("llama", "qwen2", "gemma3")
DTYPES = ("float32", "bfloat16")
KV_CACHES = ("plain", "int8x2")


def _torch():
    # llama.cpp sets this too (see llama_cpp._lib): idle OpenMP threads must not spin and steal
    # the cores another model in the process needs. It must be set before torch loads OpenMP.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise EdgespecError(
            f"torch cannot be imported ({e}): `pip install edgespec[torch]` (CPU-only: "
            "`pip install torch --index-url https://download.pytorch.org/whl/cpu`), "
            "or use the llama.cpp backend") from e
    return torch


def check_supported(path, what: str = "model"):
    """The GGUF header of a model this backend can run (no torch needed); a clear error otherwise."""
    from gguf import GGMLQuantizationType as T

    # validated: every size and offset checked against the file (a ModelFile was, when it was opened)
    header = path.header if isinstance(path, ModelFile) else read_header(path)
    path = os.fspath(path)
    arch = header.metadata["general.architecture"]
    if arch not in ARCHITECTURES:
        raise EdgespecError(
            f"{path}: architecture {arch!r} is not supported by the torch backend "
            f"(it runs {', '.join(ARCHITECTURES)}); the llama.cpp backend can run it"
            + ("" if what == "model" else f" (--{'draft-' if what == 'drafter' else ''}backend llama)"))
    ok = set(supported_tensor_types())
    for t in header.tensors:
        name = T(t.type).name
        if name not in ok:
            raise EdgespecError(
                f"{path}: tensor {t.name} has type {name}, which the torch backend cannot dequantize "
                f"(it reads {', '.join(sorted(ok))}); the llama.cpp backend can run this model")
    return header


def supported_tensor_types() -> tuple[str, ...]:
    import gguf.quants
    from gguf import GGMLQuantizationType as T
    traits = getattr(gguf.quants, "_type_traits", {})  # the types gguf.quants.dequantize knows
    return ("F32", "F16", *sorted(t.name for t in traits if t not in (T.F32, T.F16)))


@dataclass(frozen=True)
class TorchOptions:
    kind: ClassVar[str] = "torch"
    n_ctx: int = N_CTX
    n_threads: int | None = None  # None: physical cores (torch's thread count is per process)
    device: str = "cpu"           # "cpu", "cuda", "cuda:N", or "auto" (CUDA when available)
    dtype: str = "float32"        # weights and KV cache: "float32" or "bfloat16"
    n_batch: int = 512            # longer inputs are evaluated in chunks of this many tokens
    # offloading: device memory for transformer layer weights (embeddings, LM head and KV cache
    # come on top); None: every layer resident. Layers beyond it stream from host memory.
    device_budget_bytes: int | None = None
    kv_cache: str = "plain"       # "plain" (dtype) or "int8x2" (QuantSpec's INT8 = 2 x INT4 planes)
    kv_view: str = "full"         # int8x2: "full" reads INT8 (a target), "upper" the upper INT4 (a drafter)
    kv_recent: int = 32           # int8x2: a token reads itself and this many before it in full precision
    kv_rollback: int = 64         # int8x2: rollbacks up to this deep keep the recent tokens exact

    def __post_init__(self):
        if self.n_ctx < 8:
            raise EdgespecError("-c/--ctx-size must be at least 8")
        if self.dtype not in DTYPES:
            raise EdgespecError(f"unknown torch dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.n_batch < 1:
            raise EdgespecError("n_batch must be at least 1")
        if self.device_budget_bytes is not None and self.device_budget_bytes < 0:
            raise EdgespecError("device_budget_bytes must be >= 0 (None: no offloading)")
        if self.kv_cache not in KV_CACHES:
            raise EdgespecError(f"unknown torch KV cache {self.kv_cache!r}: use one of {', '.join(KV_CACHES)}")

        if self.kv_view not in VIEWS:
            raise EdgespecError(f"unknown KV view {self.kv_view!r}: use one of {', '.join(VIEWS)}")
        if self.kv_view != "full" and self.kv_cache == "plain":
            raise EdgespecError(f"kv_view={self.kv_view!r} reads a quantized cache: add kv_cache='int8x2'")
        if self.kv_recent < 0 or self.kv_rollback < 0:
            raise EdgespecError("kv_recent and kv_rollback must be >= 0")


# --- hyperparameters --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Hparams:
    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    eps: float
    freq_base: float
    freq_scale: float
    n_ctx_train: int
    neox: bool
    attn_scale: float
    swa_window: int = 0         # gemma3: sliding window of the local layers (0: none)
    swa_pattern: int = 0        # gemma3: every swa_pattern-th layer is global
    freq_base_swa: float = 10000.0


def _hparams(md: dict, path: str) -> _Hparams:
    arch = md["general.architecture"]

    def get(key, default=None):
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise EdgespecError(f"{path}: the GGUF metadata has no {arch}.{key}")
        if isinstance(value, list):  # per-layer arrays: the torch backend needs them uniform
            if len(set(value)) != 1:
                raise EdgespecError(f"{path}: per-layer {arch}.{key} is not supported by the torch backend; "
                                    "the llama.cpp backend can run this model")
            value = value[0]
        return value

    n_embd, n_head = int(get("embedding_length")), int(get("attention.head_count"))
    n_head_kv = int(get("attention.head_count_kv", n_head))
    head_dim = int(get("attention.key_length", n_embd // n_head))
    if int(get("attention.value_length", head_dim)) != head_dim or n_head % n_head_kv:
        raise EdgespecError(f"{path}: this attention layout is not supported by the torch backend; "
                            "the llama.cpp backend can run this model")
    scaling = md.get(f"{arch}.rope.scaling.type", "none")
    freq_scale = 1.0
    if scaling == "linear":
        freq_scale = 1.0 / float(md.get(f"{arch}.rope.scaling.factor", 1.0))
    elif scaling not in ("none", None):
        raise EdgespecError(f"{path}: RoPE scaling {scaling!r} is not supported by the torch backend "
                            "(none and linear are); the llama.cpp backend can run this model")
    common = dict(
        arch=arch, n_layer=int(get("block_count")), n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv,
        head_dim=head_dim, n_rot=int(get("rope.dimension_count", head_dim)),
        eps=float(get("attention.layer_norm_rms_epsilon")), freq_base=float(get("rope.freq_base", 10000.0)),
        freq_scale=freq_scale, n_ctx_train=int(get("context_length", 4096)), neox=arch != "llama",
        attn_scale=1.0 / math.sqrt(head_dim))
    if arch == "gemma3":
        # as llama.cpp: local layers use base 10000 and a sliding window, every 6th layer is global
        common.update(swa_window=int(get("attention.sliding_window", 0)), swa_pattern=6,
                      freq_base_swa=float(get("rope.freq_base_swa", 10000.0)))
    return _Hparams(**common)


# --- the KV cache -------------------------------------------------------------------------------

class PlainKV:
    """K and V as [layers, kv heads, n_ctx, head dim] in the backend's dtype (see
    kv_quant.QuantKV for the quantized one; both have begin / attend / keep / nbytes)."""

    def __init__(self, torch, shape, dtype, device):
        self.torch = torch
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.k[:, :, 0].numel() * self.k.element_size()

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def begin(self, start, stop, kpos) -> None:
        pass

    def attend(self, il, q, k, v, start, stop, mask, qpos, scale):
        """q [kv, G * n, d] over slots 0..stop after writing k, v [kv, n, d] at start..stop."""
        self.k[il, :, start:stop] = k.to(self.k.dtype)
        self.v[il, :, start:stop] = v.to(self.v.dtype)
        return self.torch.nn.functional.scaled_dot_product_attention(
            q, self.k[il, :, :stop].float(), self.v[il, :, :stop].float(), attn_mask=mask, scale=scale)

    def keep(self, src, dst) -> None:
        self.k[:, :, dst] = self.k.index_select(2, src)
        self.v[:, :, dst] = self.v.index_select(2, src)


# --- the backend --------------------------------------------------------------------------------

class TorchBackend(BorrowedVocab, Closing):
    """One GGUF model in torch, one KV cache (a single sequence)."""

    def __init__(self, path: str | os.PathLike, options: TorchOptions = TorchOptions(), vocab=None):
        path = os.fspath(path)
        self.options = options
        self._vocab = None
        header = check_supported(path)
        md = header.metadata
        arch = md["general.architecture"]
        self.hp = hp = _hparams(md, path)
        torch = self.torch = _torch()
        self.device = self._device(options.device)
        self.dtype = torch.float32 if options.dtype == "float32" else torch.bfloat16
        self.n_threads = options.n_threads or _physical_cores()
        self._set_threads()
        self._own_vocab = vocab is None  # a vocabulary passed in stays the caller's to close
        self._vocab = vocab if vocab is not None else LlamaVocab(path)
        try:
            self._load_weights(header, path)
        except BaseException:
            self.close()
            raise
        self.vocab_size = int(self._out_rows)
        self.n_ctx = options.n_ctx
        self.kv_dtype = self.dtype
        if options.kv_cache == "int8x2":
            self.kv = QuantKV(torch, hp.n_layer, hp.n_head_kv, self.n_ctx, hp.head_dim, self.device, self.kv_dtype,
                              options.kv_view, options.kv_recent, options.kv_rollback)
        else:
            self.kv = PlainKV(torch, (hp.n_layer, hp.n_head_kv, self.n_ctx, hp.head_dim), self.kv_dtype, self.device)
        self._slot_pos = torch.zeros(self.n_ctx, dtype=torch.long, device=self.device)  # RoPE position per slot
        self._init_rope()
        self.tokens: list[int] = []
        self._tree = None
        v = self._vocab
        self.facts = ModelFacts(
            path=path, architecture=arch, name=md.get("general.name") or os.path.basename(path),
            n_params=sum(t.n_elements for t in header.tensors), file_size=header.file_size,
            n_layers=hp.n_layer, n_ctx_train=hp.n_ctx_train, n_embd=hp.n_embd, vocab_size=self.vocab_size,
            vocab_type=v.vocab_type, bos=v.bos, eos=v.eos,
            chat_template=md.get("tokenizer.chat_template") if isinstance(md.get("tokenizer.chat_template"), str) else None,
            description=getattr(v, "description", ""),
            extra={"n_head_kv": hp.n_head_kv, "n_head": hp.n_head, "add_bos": v.add_bos,
                   "backend": "torch", "device": str(self.device), "dtype": options.dtype,
                   "kv_cache": options.kv_cache + (f"/{options.kv_view}" if options.kv_cache != "plain" else ""),
                   "resident_layers": hp.n_layer if self.streamer is None else len(self.streamer.resident)},
        )

    # --- loading -------------------------------------------------------------------------
    def _device(self, want: str):
        torch = self.torch
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise EdgespecError(f"device {want!r} asked for, but torch sees no CUDA device; use device='cpu'")
        try:
            return torch.device(want)
        except RuntimeError as e:
            raise EdgespecError(f"unknown torch device {want!r}: use cpu, cuda, cuda:N or auto") from e

    def _load_weights(self, header, path):
        from gguf import GGMLQuantizationType as T

        torch, hp = self.torch, self.hp
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        infos = {t.name: t for t in header.tensors}

        def raw(name):
            t = infos[name]
            start = header.data_offset + t.offset
            data = mm[start:start + t.n_bytes]
            rows = math.prod(t.shape[1:])
            return data.reshape(rows, t.n_bytes // rows), T(t.type), t.shape

        # offloading: layer weights are loaded into host memory, the streamer places them
        offload = self.options.device_budget_bytes is not None
        layer_device = torch.device("cpu") if offload else self.device

        def tensor(name, optional=False, dtype=None, device=None):
            if name not in infos:
                if optional:
                    return None
                raise EdgespecError(
                    f"{path}: tensor {name} is missing; this {hp.arch} variant is not supported by the torch "
                    "backend; the llama.cpp backend can run this model")
            data, qtype, shape = raw(name)
            out = _dequantize(torch, data, qtype).reshape(tuple(reversed(shape)))
            return out.to(device or self.device, dtype or self.dtype)

        f32 = torch.float32
        self.w: list[dict] = []
        for i in range(hp.n_layer):
            p = f"blk.{i}."
            at = layer_device
            layer = {k: tensor(p + k + ".weight", device=at) for k in
                     ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
            layer["attn_norm"] = tensor(p + "attn_norm.weight", dtype=f32, device=at)
            for k in ("attn_q", "attn_k", "attn_v", "attn_output"):
                layer[k + ".bias"] = tensor(p + k + ".bias", optional=True, dtype=f32, device=at)
            if hp.arch == "gemma3":
                for k in ("attn_q_norm", "attn_k_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
                    layer[k] = tensor(p + k + ".weight", dtype=f32, device=at)
            else:
                layer["ffn_norm"] = tensor(p + "ffn_norm.weight", dtype=f32, device=at)
            self.w.append(layer)
        self.streamer = None
        if offload:
            self.streamer = LayerStreamer(torch, self.w, self.device, self.options.device_budget_bytes)
        self.output_norm = tensor("output_norm.weight", dtype=f32)
        self.rope_freqs = tensor("rope_freqs.weight", optional=True, dtype=f32)
        if "output.weight" in infos:
            self.output = tensor("output.weight")
            # untied: the embedding table stays quantized, rows are dequantized on lookup
            data, qtype, shape = raw("token_embd.weight")
            self._embd_q = (data, qtype, shape[0])
            self.embd = None
        else:
            self.output = self.embd = tensor("token_embd.weight")
            self._embd_q = None
        self._out_rows = self.output.shape[0]
        self._mm = mm

    def _embed(self, tokens: Sequence[int]):
        torch = self.torch
        if self._embd_q is None:
            idx = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
            x = self.embd[idx].float()
        else:
            data, qtype, n_embd = self._embd_q
            x = _dequantize(torch, data[list(tokens)], qtype).reshape(len(tokens), n_embd).to(self.device)
            if self.dtype != torch.float32:  # as if the table were held in dtype
                x = x.to(self.dtype).float()
        if self.hp.arch == "gemma3":
            x = x * math.sqrt(self.hp.n_embd)
        return x

    def _init_rope(self):
        torch, hp = self.torch, self.hp
        inv = hp.freq_base ** (-torch.arange(0, hp.n_rot, 2, dtype=torch.float64) / hp.n_rot)
        if self.rope_freqs is not None:
            inv = inv / self.rope_freqs.double().cpu()
        self._inv_freq = (inv * hp.freq_scale).to(self.device)
        self._inv_freq_swa = None
        if hp.swa_pattern:
            swa = hp.freq_base_swa ** (-torch.arange(0, hp.n_rot, 2, dtype=torch.float64) / hp.n_rot)
            self._inv_freq_swa = swa.to(self.device)

    # --- model -----------------------------------------------------------------------------
    def _is_swa(self, layer: int) -> bool:
        return bool(self.hp.swa_pattern) and (layer + 1) % self.hp.swa_pattern != 0

    def _rope_tables(self, pos, inv_freq):
        angles = pos.double()[:, None] * inv_freq[None, :]           # [n, n_rot / 2]
        return angles.cos().float(), angles.sin().float()

    def _rope(self, x, cos, sin):
        """x: [n, heads, head_dim] with its first n_rot dims rotated (a new tensor)."""
        n_rot = self.hp.n_rot
        rot, rest = x[..., :n_rot], x[..., n_rot:]
        c, s = cos[:, None, :], sin[:, None, :]
        if self.hp.neox:
            a, b = rot[..., : n_rot // 2], rot[..., n_rot // 2:]
            out = self.torch.cat((a * c - b * s, a * s + b * c), dim=-1)
        else:  # adjacent pairs (llama.cpp's permuted llama weights)
            a, b = rot[..., 0::2], rot[..., 1::2]
            out = self.torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
        return out if rest.shape[-1] == 0 else self.torch.cat((out, rest), dim=-1)

    def _rms(self, x, w):
        x = x * self.torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.hp.eps)
        return x * w

    def _linear(self, x, w, b=None):
        y = (x.to(w.dtype) @ w.T).float()
        return y if b is None else y + b

    def _run(self, tokens: Sequence[int], slots, pos, mask, rows):
        """Evaluate `tokens` at cache `slots` (a range start..stop) with RoPE positions `pos`
        [n]; `mask` [n, stop] bool (True = may attend) over cache slots 0..stop. Returns the
        final hidden states of `rows` (index tensor or slice), [r, n_embd], float32."""
        torch, hp = self.torch, self.hp
        start, stop = slots
        group = hp.n_head // hp.n_head_kv
        x = self._embed(tokens)
        self._slot_pos[start:stop] = pos
        self.kv.begin(start, stop, self._slot_pos[:stop])
        qpos = pos.repeat(group)  # the query heads' rows, as the masks' rows
        # per kind of layer (swa: a gemma3 local layer), the RoPE tables and the additive mask,
        # repeated for the `group` query heads that share each kv head
        tables = {False: self._rope_tables(pos, self._inv_freq)}
        neg = torch.zeros(mask.shape, dtype=torch.float32, device=self.device).masked_fill_(~mask, float("-inf"))
        masks = {False: neg.repeat(group, 1)}
        if self._inv_freq_swa is not None:
            tables[True] = self._rope_tables(pos, self._inv_freq_swa)
            near = (pos[:, None] - self._slot_pos[None, :stop]) < (hp.swa_window or self.n_ctx + 1)
            masks[True] = neg.masked_fill(~near, float("-inf")).repeat(group, 1)
        with contextlib.closing(self._layers()) as layers:
            for il, w in layers:
                x = self._layer(il, w, x, tables, masks, qpos, start, stop)
        return x[rows]

    def _layers(self):
        """(index, weights on the compute device) per layer; streamed when offloading."""
        yield from enumerate(self.w) if self.streamer is None else self.streamer.layers()

    def _layer(self, il, w, x, tables, masks, qpos, start, stop):
        """One transformer block over x [n, n_embd] at cache slots start..stop."""
        torch, hp = self.torch, self.hp
        n, group = x.shape[0], hp.n_head // hp.n_head_kv
        swa = self._is_swa(il)
        h = self._rms(x, w["attn_norm"])
        q = self._linear(h, w["attn_q"], w["attn_q.bias"]).view(n, hp.n_head, hp.head_dim)
        k = self._linear(h, w["attn_k"], w["attn_k.bias"]).view(n, hp.n_head_kv, hp.head_dim)
        v = self._linear(h, w["attn_v"], w["attn_v.bias"]).view(n, hp.n_head_kv, hp.head_dim)
        if hp.arch == "gemma3":
            q, k = self._rms(q, w["attn_q_norm"]), self._rms(k, w["attn_k_norm"])
        c, s = tables[swa]
        q, k = self._rope(q, c, s), self._rope(k, c, s)
        # grouped-query attention without copying K/V: query head h uses kv head h // group
        qg = q.view(n, hp.n_head_kv, group, hp.head_dim).permute(1, 2, 0, 3).reshape(hp.n_head_kv, group * n, hp.head_dim)
        att = self.kv.attend(il, qg, k.transpose(0, 1), v.transpose(0, 1), start, stop, masks[swa], qpos,
                             hp.attn_scale)  # [kv, group * n, d]
        att = att.view(hp.n_head_kv, group, n, hp.head_dim).permute(2, 0, 1, 3).reshape(n, hp.n_head * hp.head_dim)
        out = self._linear(att, w["attn_output"], w["attn_output.bias"])
        if hp.arch == "gemma3":
            x = x + self._rms(out, w["post_attention_norm"])
            h = self._rms(x, w["ffn_norm"])
            f = torch.nn.functional.gelu(self._linear(h, w["ffn_gate"]), approximate="tanh") * self._linear(h, w["ffn_up"])
            x = x + self._rms(self._linear(f, w["ffn_down"]), w["post_ffw_norm"])
        else:
            x = x + out
            h = self._rms(x, w["ffn_norm"])
            f = torch.nn.functional.silu(self._linear(h, w["ffn_gate"])) * self._linear(h, w["ffn_up"])
            x = x + self._linear(f, w["ffn_down"])
        return x

    def _logits(self, hidden) -> np.ndarray:
        if hidden.shape[0] == 0:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        out = self._linear(self._rms(hidden, self.output_norm), self.output)
        return out.cpu().numpy().astype(np.float32, copy=False)

    # --- evaluation ------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return len(self.tokens)

    @property
    def capabilities(self) -> Capabilities:
        # offloading streams through a device with room for some layers: the layers all compute there
        return Capabilities("torch", trees=True, threads_settable=False)

    def forward(self, tokens: Sequence[int], logits: str = "all") -> np.ndarray:
        """Append tokens to the cache and return logits: "all" → [n, vocab], "last" → [1, vocab],
        "none" → [0, vocab]. Long inputs are evaluated in chunks of n_batch tokens."""
        self._check_open()
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be 'all', 'last' or 'none', not {logits!r}")
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise EdgespecError(
                f"context full: {len(self.tokens)} + {len(tokens)} tokens > {self.n_ctx}; raise -c/--ctx-size")
        self._check_tokens(tokens)
        torch = self.torch
        rows = []
        step = self.options.n_batch
        with torch.inference_mode():
            for begin in range(0, len(tokens), step):
                chunk = list(tokens[begin:begin + step])
                n0, n = len(self.tokens), len(chunk)
                last_chunk = begin + step >= len(tokens)
                pos = torch.arange(n0, n0 + n, device=self.device)
                mask = torch.ones((n, n0 + n), dtype=torch.bool, device=self.device).tril_(n0)
                want = slice(None) if logits == "all" else slice(n - 1, n) if logits == "last" and last_chunk else slice(0, 0)
                hidden = self._run(chunk, (n0, n0 + n), pos, mask, want)
                self.tokens.extend(int(t) for t in chunk)
                if hidden.shape[0]:
                    rows.append(self._logits(hidden))
        if not rows:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def forward_tree(self, pending: int, tree: TokenTree) -> np.ndarray:
        """One pass over the pending token and a token tree below it; every node attends to the
        context and its ancestors only (an explicit attention mask). Returns logits [1 + n, vocab]:
        after the pending token, then after each node. Call keep_path() next."""
        self._check_open()
        torch = self.torch
        n, n0 = len(tree), len(self.tokens)
        if n0 + n + 1 > self.n_ctx:
            raise EdgespecError(
                f"context full: {n0} + {n + 1} tree tokens > {self.n_ctx}; raise -c/--ctx-size")
        if n + 1 > self.options.n_batch:
            raise EdgespecError(f"a tree of {n} nodes does not fit in a batch of {self.options.n_batch}")
        chunk = [int(pending), *(int(t) for t in tree.tokens)]
        self._check_tokens(chunk)
        depth = [0] + [tree.depth(i) for i in range(n)]
        mask = torch.zeros((n + 1, n0 + n + 1), dtype=torch.bool)
        mask[:, : n0 + 1] = True          # the context and the pending token
        for i in range(n):
            for a in tree.path(i):        # ancestors and the node itself
                mask[i + 1, n0 + 1 + a] = True
        with torch.inference_mode():
            pos = torch.tensor([n0 + d for d in depth], device=self.device)
            hidden = self._run(chunk, (n0, n0 + n + 1), pos, mask.to(self.device), slice(None))
            out = self._logits(hidden)
        self.tokens.append(int(pending))
        self._tree = (n0, tree)
        return out

    def keep_path(self, path: Sequence[int]) -> None:
        """After forward_tree: keep the nodes of `path` (root's child first) after the pending
        token; the other branches' cache slots are dropped (they lie past n_past)."""
        if self._tree is None:
            raise EdgespecError("keep_path() needs a forward_tree() first")
        n0, tree = self._tree
        self._tree = None
        if not path:
            return
        torch = self.torch
        src = torch.tensor([n0 + 1 + i for i in path], device=self.device)
        dst = slice(n0 + 1, n0 + 1 + len(path))
        with torch.inference_mode():
            self.kv.keep(src, dst)
            self._slot_pos[dst] = self._slot_pos.index_select(0, src)
        self.tokens.extend(int(tree.tokens[i]) for i in path)

    def truncate(self, n_past: int) -> None:
        """Roll the cache back to its first n_past tokens (exact: later slots are ignored)."""
        self._check_open()
        if n_past < len(self.tokens):
            del self.tokens[max(n_past, 0):]

    # --- helpers and lifetime ----------------------------------------------------------------------
    def _check_tokens(self, tokens):
        bad = [t for t in tokens if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise EdgespecError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")

    def _set_threads(self):
        if self.device.type == "cpu" and self.torch.get_num_threads() != self.n_threads:
            self.torch.set_num_threads(self.n_threads)

    def _check_open(self) -> None:
        if getattr(self, "w", None) is None:
            raise EdgespecError(f"the model {os.path.basename(self.facts.path)} was closed")
        self._set_threads()

    def close(self) -> None:
        if getattr(self, "streamer", None) is not None:
            self.streamer.close()
            self.streamer = None
        if getattr(self, "w", None) is not None:
            self.w = self.output = self.embd = self._embd_q = self._mm = None
            self.kv = None
        if getattr(self, "_vocab", None) is not None and self._own_vocab:
            self._vocab.close()
        self._vocab = None


def _dequantize(torch, data: np.ndarray, qtype):
    """GGML bytes [rows, bytes per row] → float32 tensor [rows, elements per row], by the `gguf`
    package's numpy code (a torch port of the simple block formats was tried: slower on CPU)."""
    import gguf.quants

    return torch.from_numpy(np.array(gguf.quants.dequantize(np.asarray(data), qtype), dtype=np.float32))


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1
