"""GGUF models exported to ONNX (from the torch backend's model code) and run by onnxruntime.

Minimal: chain passes only (no `forward_tree`: no token trees), a single sequence; float32
weights, or 8-bit weights quantized by onnxruntime's own tools (`OnnxOptions.weights`, below).

Export (`export_onnx`): the torch backend loads and dequantizes the GGUF (torch_backend.py), and
`_Decoder` below, a module over those same weights and helpers (`_embed` semantics, `_rms`,
`_rope`, `_linear`), is traced by `torch.onnx.export` (the legacy TorchScript exporter). The graph:

    inputs   input_ids [n] int64, rope_cos / rope_sin [n, n_rot/2] float32 (computed on the host
             in float64, as the torch backend does), attn_mask [n, past + n] float32 (additive:
             0 or -inf), past_k / past_v [past, layers, kv heads, head dim] float32
    outputs  logits [n, vocab], new_k / new_v [n, layers, kv heads, head dim] (keys after RoPE)

with `n` and `past` dynamic. The cache is laid out token-major so that the host keeps one
preallocated [n_ctx, layers, kv heads, head dim] array per K and V: passing the past is a
contiguous slice (no copy), appending writes the new rows, and rollback (`truncate`) is exact:
the rows past n_past are simply ignored and later overwritten.

The exported file is cached under `models.state_dir() / "onnx"`, keyed by the GGUF's path, size
and mtime and by `EXPORT_VERSION`. Architectures: those of the torch backend without sliding
windows (`llama`, `qwen2`); gemma3 is refused (`check_supported`, from the GGUF header).

Weights (`OnnxOptions.weights`), quantized from the float32 export and cached next to it:

    "float32"       the export as is
    "int8"          onnxruntime.quantization's MatMulNBitsQuantizer: every weight MatMul (the LM
                    head included) becomes MatMulNBits with 8-bit symmetric weights in blocks of
                    32 along the input dimension, accuracy_level 4 (activations quantized to int8
                    per row and block on the fly, int8 dot products; without it, onnxruntime
                    computes in float and runs far slower than float32).
    "int8-dynamic"  onnxruntime.quantization.quantize_dynamic: MatMul weights QUInt8 per tensor,
                    activations quantized per tensor at run time (MatMulInteger). The fastest, but
                    per-tensor activation scales meet the outlier channels of LLM activations
                    (worst at the FFN down projections), and per-channel QInt8 garbles (the u8s8
                    kernels saturate on AVX2 without VNNI). A scale spans the whole pass, so a
                    token's logits depend on the other tokens of its pass: meant for drafters, not
                    targets.

Agreement with float32 and speeds: tests/backends/test_onnx_backend.py, bench/backends.py and the
README's table.

The weights of the exported graph are Constant nodes (the traced module closes over tensors);
both quantizers only see initializers, so the 2-D float Constants are moved to initializers first.

A model holds float32 (or 8-bit) copies of every matrix plus a float32 embedding table (tied
models: twice, once for the lookup and once, transposed, for the LM head). Past protobuf's 2 GB
(Qwen2.5-Coder-0.5B: 2.5 GB; its export took 90 s and 9.5 GB of memory here) the weights go to
one `<name>.onnx.data` file beside the model: torch writes one file per weight, named after its
node, names that would collide between the models of the cache folder, so the export rewrites
them (`_single_data_file`).

Providers: `OnnxOptions.providers` in order of preference; one that this onnxruntime build does
not have is dropped with a warning (recorded in `facts.extra["provider_note"]`), and the CPU
provider is always last.

onnxruntime, onnx and torch are imported lazily, inside this module's functions only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from edge_spec.backends import torch_backend
from edge_spec.backends.common import BorrowedVocab, Closing
from edge_spec.backends.llama_cpp import LlamaVocab
from edge_spec.backends.torch_backend import TorchBackend, TorchOptions, _dequantize, _hparams, _physical_cores
from edge_spec.defaults import N_CTX, ONNX_WEIGHTS
from edge_spec.models import registry as models
from edge_spec.models.gguf_file import read_header
from edge_spec.models.modelfile import ModelFile
from edge_spec.types import Capabilities, EdgespecError, ModelFacts

EXPORT_VERSION = 1
QUANT_VERSION = 1  # of quantize_onnx's recipes: part of the quantized files' names
ARCHITECTURES = ("llama", "qwen2")
WEIGHTS = ONNX_WEIGHTS
CPU = "CPUExecutionProvider"


def _ort():
    try:
        import onnxruntime
    except ImportError as e:  # pragma: no cover - depends on the install
        raise EdgespecError(f"onnxruntime cannot be imported ({e}): `pip install edgespec[onnx]`") from e
    return onnxruntime


@dataclass(frozen=True)
class OnnxOptions:
    kind: ClassVar[str] = "onnx"
    n_ctx: int = N_CTX
    n_threads: int | None = None                # None: physical cores
    providers: tuple[str, ...] = (CPU,)         # in order of preference; CPU is always added last
    cache_dir: str | None = None                # exported models; None: state_dir()/onnx
    weights: str = "float32"                    # "float32", "int8" or "int8-dynamic" (module docstring)

    def __post_init__(self):
        if self.n_ctx < 8:
            raise EdgespecError("-c/--ctx-size must be at least 8")
        if self.weights not in WEIGHTS:
            raise EdgespecError(f"unknown onnx weights {self.weights!r}: use {', '.join(WEIGHTS)}")
        if isinstance(self.providers, str):
            object.__setattr__(self, "providers", (self.providers,))


def check_supported(path, what: str = "model"):
    """The GGUF header of a model this backend can export and run (no torch or onnxruntime
    needed); a clear error otherwise. `what`: "target" or "drafter" names the CLI option to use."""
    # validated: every size and offset checked against the file (a ModelFile was, when it was opened)
    header = path.header if isinstance(path, ModelFile) else read_header(path)
    path = os.fspath(path)
    arch = header.metadata["general.architecture"]
    flag = {"target": " (--backend {})", "drafter": " (--draft-backend {})"}.get(what, "")
    if arch not in ARCHITECTURES:
        others = "torch or llama.cpp backend" if arch in torch_backend.ARCHITECTURES else "llama.cpp backend"
        raise EdgespecError(
            f"{path}: architecture {arch!r} is not supported by the onnx backend (it runs {', '.join(ARCHITECTURES)}); "
            f"the {others} can run it" + flag.format("llama or torch" if "torch" in others else "llama"))
    if "rope_freqs.weight" in {t.name for t in header.tensors}:
        raise EdgespecError(f"{path}: rope_freqs (llama3's RoPE scaling) is not supported by the onnx backend; "
                            "the torch or llama.cpp backend can run it" + flag.format("llama or torch"))
    torch_backend.check_supported(path, what)  # tensor types: the export dequantizes with the torch backend
    return header


# --- export ---------------------------------------------------------------------------------------

def _decoder(tb):
    """A torch module over a TorchBackend's weights: (ids, cos, sin, mask, past_k, past_v) →
    (logits, new_k, new_v). Same arithmetic as TorchBackend._layer (explicit softmax attention
    instead of SDPA)."""
    torch, hp = tb.torch, tb.hp
    if tb.embd is not None:
        embd = tb.embd.float()
    else:  # untied and kept quantized by the torch backend: the full table, dequantized

        data, qtype, n_embd = tb._embd_q
        embd = _dequantize(torch, data, qtype).reshape(-1, n_embd)

    class Decoder(torch.nn.Module):
        def forward(self, ids, cos, sin, mask, past_k, past_v):
            n = ids.shape[0]
            group = hp.n_head // hp.n_head_kv
            x = embd[ids]
            new_k, new_v = [], []
            for il, w in enumerate(tb.w):
                h = tb._rms(x, w["attn_norm"])
                q = tb._linear(h, w["attn_q"], w["attn_q.bias"]).view(n, hp.n_head, hp.head_dim)
                k = tb._linear(h, w["attn_k"], w["attn_k.bias"]).view(n, hp.n_head_kv, hp.head_dim)
                v = tb._linear(h, w["attn_v"], w["attn_v.bias"]).view(n, hp.n_head_kv, hp.head_dim)
                q, k = tb._rope(q, cos, sin), tb._rope(k, cos, sin)
                new_k.append(k)
                new_v.append(v)
                keys = torch.cat((past_k[:, il], k), 0).permute(1, 2, 0)        # [kv, d, T]
                values = torch.cat((past_v[:, il], v), 0).permute(1, 0, 2)      # [kv, T, d]
                qg = q.view(n, hp.n_head_kv, group, hp.head_dim).permute(1, 2, 0, 3)  # [kv, G, n, d]
                scores = torch.matmul(qg, keys.unsqueeze(1)) * hp.attn_scale + mask  # [kv, G, n, T]
                att = torch.matmul(torch.softmax(scores, -1), values.unsqueeze(1))    # [kv, G, n, d]
                att = att.permute(2, 0, 1, 3).reshape(n, hp.n_head * hp.head_dim)
                x = x + tb._linear(att, w["attn_output"], w["attn_output.bias"])
                h = tb._rms(x, w["ffn_norm"])
                f = torch.nn.functional.silu(tb._linear(h, w["ffn_gate"])) * tb._linear(h, w["ffn_up"])
                x = x + tb._linear(f, w["ffn_down"])
            logits = tb._linear(tb._rms(x, tb.output_norm), tb.output)
            return logits, torch.stack(new_k, 1), torch.stack(new_v, 1)

    return Decoder()


def _cache_path(gguf_path: str, cache_dir: str | None) -> Path:
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|v{EXPORT_VERSION}"
                         .encode()).hexdigest()[:16]
    if cache_dir is None:
        cache_dir = models.state_dir() / "onnx"
    return Path(cache_dir) / f"{Path(gguf_path).stem}-{key}.onnx"


def export_onnx(gguf_path, out_path, opset: int = 17) -> Path:
    """Export a GGUF model (llama or qwen2) to an ONNX file with KV-cache inputs and outputs."""
    gguf_path, out_path = os.fspath(gguf_path), Path(out_path)
    check_supported(gguf_path)
    with TorchBackend(gguf_path, TorchOptions(n_ctx=8)) as tb:
        if tb.streamer is not None or tb.dtype != tb.torch.float32:  # pragma: no cover - defaults
            raise EdgespecError("the onnx export needs float32 resident weights")
        torch, hp = tb.torch, tb.hp
        model = _decoder(tb)
        n, past = 3, 2
        dummy = (torch.tensor([1, 2, 3], dtype=torch.long),
                 torch.zeros(n, hp.n_rot // 2), torch.zeros(n, hp.n_rot // 2), torch.zeros(n, past + n),
                 torch.zeros(past, hp.n_layer, hp.n_head_kv, hp.head_dim),
                 torch.zeros(past, hp.n_layer, hp.n_head_kv, hp.head_dim))
        with _staging(out_path) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, dummy, str(tmp), dynamo=False, opset_version=opset, do_constant_folding=True,
                input_names=["input_ids", "rope_cos", "rope_sin", "attn_mask", "past_k", "past_v"],
                output_names=["logits", "new_k", "new_v"],
                dynamic_axes={"input_ids": {0: "n"}, "rope_cos": {0: "n"}, "rope_sin": {0: "n"},
                              "attn_mask": {0: "n", 1: "total"}, "past_k": {0: "past"}, "past_v": {0: "past"},
                              "logits": {0: "n"}, "new_k": {0: "n"}, "new_v": {0: "n"}})
            if len(list(tmp.parent.iterdir())) > 1:
                # past protobuf's 2 GB torch writes every weight to its own file next to the model,
                # named after the node (`_Constant_12_attr__value`): the same names for every model
                # in the cache folder. Rewritten as initializers in one `<name>.onnx.data` file.
                _single_data_file(tmp)
    return out_path


@contextmanager
def _staging(out: Path):
    """A path to write `out` at in a fresh folder beside it; on success, its files (the model and
    any external data file) are moved into place, the model last, so a reader never sees a model
    without its data."""
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.stem}.", dir=out.parent))
    try:
        yield folder / out.name
        for f in sorted(folder.iterdir(), key=lambda f: f.name == out.name):
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _single_data_file(path: Path) -> None:
    import onnx

    model = onnx.load(str(path))  # with its external data
    for f in path.parent.iterdir():
        f.unlink()
    _constants_to_initializers(onnx, model)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


# --- weight quantization (onnxruntime.quantization) -------------------------------------------------

def quantized_path(onnx_path, weights: str) -> Path:
    """Where the `weights` copy of an exported model is cached: next to it."""
    onnx_path = Path(onnx_path)
    return onnx_path if weights == "float32" else onnx_path.with_name(f"{onnx_path.stem}.{weights}-q{QUANT_VERSION}.onnx")


def quantize_onnx(src, out, weights: str = "int8") -> Path:
    """Quantize the MatMul weights of an exported model (`export_onnx`) with onnxruntime's tools:
    "int8" (MatMulNBits, 8-bit blocks of 32) or "int8-dynamic" (quantize_dynamic); see the module
    docstring. Written to a temporary folder, then moved into place (data file first)."""
    import logging

    if weights not in WEIGHTS[1:]:
        raise EdgespecError(f"unknown onnx weight quantization {weights!r}: use {', '.join(WEIGHTS[1:])}")
    ort = _ort()
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise EdgespecError(f"onnx weight quantization needs onnx and onnxruntime.quantization ({e}): "
                            "`pip install edgespec[onnx]`") from e
    src, out = Path(src), Path(out)
    model = onnx.load(str(src))
    # protobuf's 2 GB limit: weights in a separate file past it
    large = sum(len(t.raw_data) for t in model.graph.initializer) + \
        sum(len(a.t.raw_data) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute) > 1.8 * 2**30
    _constants_to_initializers(onnx, model)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing", once per model
    try:
        with _staging(out) as tmp:
            if weights == "int8":
                q = MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True, accuracy_level=4,
                                         op_types_to_quantize=("MatMul",))
                q.process()
                q.model.save_model_to_file(str(tmp), use_external_data_format=large)
            else:
                quantize_dynamic(model, tmp, op_types_to_quantize=["MatMul"], per_channel=False,
                                 weight_type=QuantType.QUInt8, use_external_data_format=large,
                                 extra_options={"MatMulConstBOnly": True})
    except EdgespecError:
        raise
    except Exception as e:
        raise EdgespecError(f"onnxruntime {ort.__version__} could not quantize {src.name} to {weights} "
                            f"({type(e).__name__}: {e})") from e
    finally:
        root.setLevel(level)
    return out


def _constants_to_initializers(onnx, model) -> int:
    """Move the 2-D float Constant nodes (the traced weights) to graph initializers, which is
    where the quantizers look for weights. Returns how many were moved."""
    graph, kept, moved = model.graph, [], 0
    for node in graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is not None and attr.name == "value" and attr.t.data_type == onnx.TensorProto.FLOAT \
                and len(attr.t.dims) == 2:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            moved += 1
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return moved


# --- the backend -----------------------------------------------------------------------------------

class OnnxBackend(BorrowedVocab, Closing):
    """One model run by onnxruntime, one KV cache (a single sequence). Takes a GGUF (exported
    and cached on first use) or an .onnx file plus the GGUF it came from (`gguf=`, for the
    vocabulary, hyperparameters and facts)."""

    def __init__(self, path, options: OnnxOptions = OnnxOptions(), gguf=None, vocab=None,
                 progress: Callable[[str], None] | None = None):
        """`progress(stage)` is called before the slow first-use steps ("exporting", "quantizing")."""
        path = os.fspath(path)
        self.options = options
        self._vocab = self.session = None
        ort = _ort()  # before any export: a missing onnxruntime is said at once
        if path.endswith(".onnx"):
            if gguf is None:
                raise EdgespecError("an .onnx model needs gguf= (the GGUF it was exported from)")
            onnx_path, gguf = Path(path), os.fspath(gguf)
            header = check_supported(gguf)
        else:
            gguf = path
            header = check_supported(gguf)
            onnx_path = _cache_path(gguf, options.cache_dir)
            if not onnx_path.exists():
                if progress:
                    progress("exporting to ONNX")
                export_onnx(gguf, onnx_path)
        if options.weights != "float32":
            source, onnx_path = onnx_path, quantized_path(onnx_path, options.weights)
            if not onnx_path.exists() or onnx_path.stat().st_mtime_ns < source.stat().st_mtime_ns:
                if progress:
                    progress(f"quantizing to {options.weights}")
                quantize_onnx(source, onnx_path, options.weights)
        md = header.metadata
        self.hp = hp = _hparams(md, gguf)
        available = ort.get_available_providers()
        missing = [p for p in options.providers if p not in available]
        self.provider_note = ""
        if missing:
            self.provider_note = (f"onnxruntime provider(s) {', '.join(missing)} not available in this install "
                                  f"(it has {', '.join(available)}); falling back to {CPU}")
            warnings.warn(self.provider_note, RuntimeWarning, stacklevel=2)
        providers = [p for p in options.providers if p in available and p != CPU] + [CPU]
        self.n_threads = options.n_threads or _physical_cores()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.n_threads
        so.inter_op_num_threads = 1
        # idle threads must not spin and steal the cores another model in the process needs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(onnx_path), so, providers=providers)
        except Exception as e:  # e.g. an onnxruntime too old for MatMulNBits with 8 bits
            raise EdgespecError(f"onnxruntime {ort.__version__} cannot load {onnx_path.name} "
                                f"({type(e).__name__}: {e})") from e
        self.providers = self.session.get_providers()
        self.onnx_path = str(onnx_path)
        self._own_vocab = vocab is None
        self._vocab = vocab if vocab is not None else LlamaVocab(gguf)
        self.n_ctx = options.n_ctx
        shape = (self.n_ctx, hp.n_layer, hp.n_head_kv, hp.head_dim)
        self._k = np.zeros(shape, np.float32)
        self._v = np.zeros(shape, np.float32)
        inv = hp.freq_base ** (-np.arange(0, hp.n_rot, 2, dtype=np.float64) / hp.n_rot)
        self._inv_freq = inv * hp.freq_scale
        self.tokens: list[int] = []
        output = next((t for t in header.tensors if t.name == "output.weight"), None) or \
            next(t for t in header.tensors if t.name == "token_embd.weight")
        self.vocab_size = int(output.shape[1])
        v = self._vocab
        self.facts = ModelFacts(
            path=gguf, architecture=hp.arch, name=md.get("general.name") or os.path.basename(gguf),
            n_params=sum(t.n_elements for t in header.tensors), file_size=header.file_size,
            n_layers=hp.n_layer, n_ctx_train=hp.n_ctx_train, n_embd=hp.n_embd, vocab_size=self.vocab_size,
            vocab_type=v.vocab_type, bos=v.bos, eos=v.eos,
            chat_template=md.get("tokenizer.chat_template") if isinstance(md.get("tokenizer.chat_template"), str) else None,
            description=getattr(v, "description", ""),
            extra={"n_head_kv": hp.n_head_kv, "n_head": hp.n_head, "add_bos": v.add_bos, "backend": "onnx",
                   "weights": options.weights, "providers": list(self.providers), "provider_note": self.provider_note,
                   "onnx_path": self.onnx_path})

    @property
    def n_past(self) -> int:
        return len(self.tokens)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities("onnx", trees=False, threads_settable=False)

    def forward(self, tokens: Sequence[int], logits: str = "all") -> np.ndarray:
        """Append tokens to the cache and return logits: "all" → [n, vocab], "last" → [1, vocab],
        "none" → [0, vocab]."""
        self._check_open()
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be 'all', 'last' or 'none', not {logits!r}")
        n0, n = len(self.tokens), len(tokens)
        if n0 + n > self.n_ctx:
            raise EdgespecError(f"context full: {n0} + {n} tokens > {self.n_ctx}; raise -c/--ctx-size")
        bad = [t for t in tokens if not 0 <= int(t) < self.vocab_size]
        if bad:
            raise EdgespecError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        if n == 0:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        angles = np.arange(n0, n0 + n, dtype=np.float64)[:, None] * self._inv_freq[None, :]
        mask = np.zeros((n, n0 + n), np.float32)
        mask[:, n0:] = np.triu(np.full((n, n), -np.inf, np.float32), 1)
        out, new_k, new_v = self.session.run(None, {
            "input_ids": np.asarray(tokens, dtype=np.int64),
            "rope_cos": np.cos(angles).astype(np.float32), "rope_sin": np.sin(angles).astype(np.float32),
            "attn_mask": mask, "past_k": self._k[:n0], "past_v": self._v[:n0]})
        self._k[n0:n0 + n] = new_k
        self._v[n0:n0 + n] = new_v
        self.tokens.extend(int(t) for t in tokens)
        if logits == "all":
            return out
        return out[-1:] if logits == "last" else np.zeros((0, self.vocab_size), dtype=np.float32)

    def truncate(self, n_past: int) -> None:
        """Roll the cache back to its first n_past tokens (exact: later rows are ignored)."""
        self._check_open()
        if n_past < len(self.tokens):
            del self.tokens[max(n_past, 0):]

    # --- lifetime ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.session is None:
            raise EdgespecError(f"the model {os.path.basename(self.facts.path)} was closed")

    def close(self) -> None:
        self.session = None
        if getattr(self, "_vocab", None) is not None and self._own_vocab:
            self._vocab.close()
        self._vocab = None
