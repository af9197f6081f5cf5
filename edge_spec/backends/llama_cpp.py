"""GGUF models through llama-cpp-python's low-level API.

One LlamaCppBackend = one model + one context (its own thread count and KV cache), sequence 0.
Only the rows of logits that were asked for are copied out ([n, vocab] per call): there is no
n_ctx × n_vocab buffer as in the high-level `Llama` class.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections import deque
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import numpy as np

from edge_spec.backends.common import Closing
from edge_spec.backends.paging import Pager, per_pass_ranges
from edge_spec.core.tree import TokenTree
from edge_spec.defaults import N_CTX
from edge_spec.models.gguf_file import validate
from edge_spec.types import Capabilities, EdgespecError, ModelFacts

KV_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}


@dataclass(frozen=True)
class LlamaOptions:
    kind: ClassVar[str] = "llama"
    n_ctx: int = N_CTX
    n_threads: int | None = None  # None: physical cores
    n_gpu_layers: int = 0
    type_k: str = "f16"
    type_v: str = "f16"
    n_batch: int = 512
    n_seq_max: int = 1      # > 1: token trees of up to n_seq_max - 1 leaves in one pass (forward_tree)
    use_extra_bufts: bool | None = None  # None: on, unless the AMX crash applies (see amx_unsafe)
    use_mmap: bool = True   # False: weights read into memory of its own (a drafter next to a paged target)
    # a paged target (backends/paging.py): this many bytes of the weights every pass reads are read
    # from disk at every pass, the rest pinned in RAM; None: resident (the OS pages it as it likes)
    disk_bytes: int | None = None
    read_ahead: bool = True  # a paged target: read the next pass's first streamed weights between passes
    drop_behind: bool = True  # a paged target: drop each block's streamed weights once a pass has computed it
    # ggml RPC workers ("host:port", backends/rpc.py): n_gpu_layers of the blocks go to them (split
    # by their free memory, as llama.cpp does with --rpc), the rest stay on this CPU. ggml's RPC
    # client aborts the process on a lost connection: such a model is loaded in a process of its
    # own (backends/isolated.py), never in the caller's
    rpc: tuple[str, ...] = ()

    def __post_init__(self):
        if self.n_ctx < 8:
            raise EdgespecError("-c/--ctx-size must be at least 8")
        for name in (self.type_k, self.type_v):
            if name not in KV_TYPES:
                raise EdgespecError(f"unknown KV cache type {name!r}: use one of {', '.join(KV_TYPES)}")


def _lib():
    # llama.cpp's OpenMP threads spin after each graph by default. With a drafter and a target in
    # one process, the idle model's spinning threads steal the cores the other needs (measured
    # here: a 135M self-drafting test took 31 s instead of 3 s). Passive waiting costs a single
    # model little; it must be set before the OpenMP runtime loads, and a user's setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        import llama_cpp
    except ImportError as e:  # pragma: no cover - depends on the install
        raise EdgespecError(
            f"llama-cpp-python cannot be imported ({e}): run `bash scripts/setup.sh` "
            "(it builds llama-cpp-python 0.3.36 with flags that are safe on this CPU)") from e
    return llama_cpp


class _Log:
    """Routes llama.cpp's log to a short ring buffer, so errors can quote its last lines."""

    def __init__(self, lib):
        self.lines: deque[str] = deque(maxlen=20)
        self.echo = os.environ.get("EDGESPEC_LLAMA_LOG") == "1"

        def callback(level, text, _user):
            line = text.decode("utf-8", "replace") if text else ""
            if self.echo:
                print(line, end="", file=__import__("sys").stderr)
            if line.strip():
                self.lines.append(line.strip())

        self._c_callback = lib.llama_log_callback(callback)  # keep a reference: C holds it
        lib.llama_log_set(self._c_callback, ctypes.c_void_p(0))

    def last(self) -> str:
        errors = [ln for ln in self.lines if "error" in ln.lower() or "failed" in ln.lower()]
        return (errors or list(self.lines) or ["no message from llama.cpp"])[-1]


_state: dict = {}  # process-wide llama.cpp initialisation (backend + log hook), done once


def _init():
    if not _state:
        lib = _lib()
        lib.llama_backend_init()
        _state["lib"], _state["log"] = lib, _Log(lib)
    return _state["lib"], _state["log"]


def rpc_devices(endpoints) -> ctypes.Array:
    """Every device of each RPC worker, as a NULL-terminated array for llama_model_params.devices.
    Connects to the workers: ggml aborts the process if one does not answer (backends/isolated.py)."""
    import glob

    import llama_cpp

    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    try:
        rpc, ggml = (ctypes.CDLL((glob.glob(os.path.join(libdir, f"lib{name}.*")) or [name])[0])
                     for name in ("ggml-rpc", "ggml"))
    except OSError as e:
        raise EdgespecError(f"this llama-cpp-python was built without ggml's RPC backend ({e}): "
                            "run `bash scripts/setup.sh`, which builds it with -DGGML_RPC=ON") from e
    rpc.ggml_backend_rpc_add_server.restype = ctypes.c_void_p
    rpc.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    devices = []
    for endpoint in endpoints:
        reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
        if not reg:
            raise EdgespecError(f"ggml could not add the RPC worker {endpoint}")
        devices += [ggml.ggml_backend_reg_dev_get(reg, i) for i in range(ggml.ggml_backend_reg_dev_count(reg))]
    return (ctypes.c_void_p * (len(devices) + 1))(*devices, None)


def amx_unsafe(lib) -> bool:
    """True when this CPU has AMX and this llama.cpp build uses it: llama.cpp 0.3.36's AMX path
    crashes on batches of quantized weights, so such builds must load without extra buffers."""
    info = lib.llama_print_system_info().decode(errors="replace")
    return "AMX_INT8 = 1" in info and cpu_has_amx()


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_int8" in f.read()
    except OSError:
        return False


def physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class VocabMethods:
    """Tokenizer calls on a llama.cpp vocabulary; needs self.lib, self.vocab, self._pieces and
    self._check_open(). Shared by LlamaCppBackend and the torch backend's vocab-only load."""

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        self._check_open()
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (self.lib.llama_token * cap)()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (self.lib.llama_token * cap)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token adds to the text (special tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is None:
            self._check_open()
            buf = ctypes.create_string_buffer(64)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            cached = self._pieces[token] = buf.raw[:n]
        return cached

    def token_text(self, token: int) -> str:
        """The vocabulary's own string for a token (as stored in the GGUF)."""
        self._check_open()
        return self.lib.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        self._check_open()
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")


class LlamaVocab(VocabMethods):
    """llama.cpp's tokenizer for a GGUF file, from a vocab_only load (no weights, no context)."""

    def __init__(self, path: str):
        self.lib, self._log = lib, log = _init()
        params = lib.llama_model_default_params()
        params.vocab_only = True
        self.model = lib.llama_model_load_from_file(path.encode(), params)
        if not self.model:
            raise EdgespecError(f"llama.cpp could not load the vocabulary of {path}: {log.last()}")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_tokens = lib.llama_vocab_n_tokens(self.vocab)
        self.vocab_type = lib.llama_vocab_type(self.vocab)
        self.bos, self.eos = lib.llama_vocab_bos(self.vocab), lib.llama_vocab_eos(self.vocab)
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        desc = ctypes.create_string_buffer(256)
        lib.llama_model_desc(self.model, desc, len(desc))
        self.description = desc.value.decode("utf-8", "replace")
        self._pieces: dict[int, bytes] = {}

    def _check_open(self):
        if self.vocab is None:
            raise EdgespecError("the vocabulary was closed")

    def close(self) -> None:
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = self.vocab = None


class LlamaCppBackend(VocabMethods, Closing):
    def __init__(self, path: str | os.PathLike, options: LlamaOptions = LlamaOptions(),
                 progress: Callable[[float], None] | None = None, *, _parent: "LlamaCppBackend | None" = None,
                 header=None):
        path = os.fspath(path)
        self.lib, self._log = lib, log = _init()
        self.options = options
        self.n_threads = options.n_threads or physical_cores()
        self._parent = _parent  # a sibling context borrows its parent's weights
        if _parent is None:
            if header is None:  # the whole header, bounds-checked, before llama.cpp parses it
                validate(path)   # (`header`: the caller validated this file already, edge_spec.models.modelfile)
            self.model = self._load_model(path, options, progress)
        else:
            self.model = _parent.model
        try:
            self.ctx = self._new_context(options)
        except Exception:
            if _parent is None:
                lib.llama_model_free(self.model)
            raise
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.vocab_size = lib.llama_vocab_n_tokens(self.vocab)
        # llama.cpp may round the context up; the limit we keep is the one asked for
        self.n_ctx = min(options.n_ctx, lib.llama_n_ctx(self.ctx))
        self.n_batch = lib.llama_n_batch(self.ctx)
        self.mem = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(self.n_batch, 0, max(options.n_seq_max, 1))
        self.tokens: list[int] = []  # what the KV cache holds, in order (sequence 0)
        self._grown: set[int] = set()  # tree nodes held by extend_tree (node i in sequence i + 1)
        self.facts = self._read_facts(path)
        self._pieces: dict[int, bytes] = {}
        self.pager = None
        if options.disk_bytes is not None and _parent is None:
            self.pager = _pager(path, header, options.disk_bytes, options.read_ahead, options.drop_behind)

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities("llama", trees=True, threads_settable=True, gpu_layers=self.options.n_gpu_layers,
                            tree_growth=True, siblings=True, row_logits=True,
                            disk_bytes=self.pager.stats.streamed_bytes if self.pager is not None else 0)

    def evict(self) -> None:
        """A paged target: drop the streamed weights from the page cache (calibration)."""
        if self.pager is not None:
            self.pager.evict()

    def _llama_decode(self, b) -> int:
        """One pass (a paged target's Pager hears of it)."""
        if self.pager is None:
            return self.lib.llama_decode(self.ctx, b)
        self.pager.start_pass()
        try:
            return self.lib.llama_decode(self.ctx, b)
        finally:
            self.pager.finish_pass()

    # --- loading -----------------------------------------------------------------------
    def _load_model(self, path, options, progress):
        lib = self.lib
        params = lib.llama_model_default_params()
        params.n_gpu_layers = options.n_gpu_layers
        params.use_mmap = options.use_mmap
        if options.rpc:  # the workers are the devices layers are offloaded to (none of this host's GPUs)
            self._devices = rpc_devices(options.rpc)  # NULL-terminated; llama.cpp reads it while loading
            params.devices = ctypes.addressof(self._devices)
        extra = options.use_extra_bufts
        # a paged target keeps its weights in the file's mapping: repacking would copy them all to RAM
        params.use_extra_bufts = False if options.disk_bytes is not None else (
            (not amx_unsafe(lib)) if extra is None else extra)
        if progress is not None:
            def on_progress(fraction, _user):
                progress(float(fraction))
                return True

            callback = lib.llama_progress_callback(on_progress)
            params.progress_callback = callback
        model = lib.llama_model_load_from_file(path.encode(), params)
        if not model:
            raise EdgespecError(f"llama.cpp could not load {path}: {self._log.last()}")
        return model

    def _new_context(self, options):
        lib = self.lib
        params = lib.llama_context_default_params()
        params.n_ctx = options.n_ctx
        params.n_batch = params.n_ubatch = min(options.n_batch, options.n_ctx)
        # llama.cpp reserves an output row per sequence and asserts (aborts) unless they fit a batch
        params.n_batch = max(params.n_batch, options.n_seq_max)
        params.n_threads = params.n_threads_batch = self.n_threads
        params.type_k, params.type_v = KV_TYPES[options.type_k], KV_TYPES[options.type_v]
        params.no_perf = True
        if options.n_seq_max > 1:  # tree branches are sequences sharing one KV cache
            params.n_seq_max, params.kv_unified = options.n_seq_max, True
        if options.disk_bytes is not None and options.drop_behind:  # a paged target's Pager drops each block behind the pass
            self._on_eval = _block_callback(lib, lambda: (self._parent or self).pager)
            params.cb_eval = self._on_eval
        ctx = lib.llama_init_from_model(self.model, params)
        if not ctx:
            raise EdgespecError(
                f"llama.cpp could not create a context of {options.n_ctx} tokens: {self._log.last()}; "
                "try a smaller -c/--ctx-size")
        return ctx

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def _read_facts(self, path: str) -> ModelFacts:
        lib, m = self.lib, self.model
        template = lib.llama_model_chat_template(m, None)
        desc = ctypes.create_string_buffer(256)
        lib.llama_model_desc(m, desc, len(desc))
        return ModelFacts(
            path=path,
            architecture=self._meta("general.architecture") or "unknown",
            name=self._meta("general.name") or os.path.basename(path),
            n_params=int(lib.llama_model_n_params(m)),
            file_size=os.path.getsize(path),
            n_layers=lib.llama_model_n_layer(m),
            n_ctx_train=lib.llama_model_n_ctx_train(m),
            n_embd=lib.llama_model_n_embd(m),
            vocab_size=self.vocab_size,
            vocab_type=lib.llama_vocab_type(self.vocab),
            bos=lib.llama_vocab_bos(self.vocab),
            eos=lib.llama_vocab_eos(self.vocab),
            chat_template=template.decode("utf-8", "replace") if template else None,
            description=desc.value.decode("utf-8", "replace"),
            extra={"n_head_kv": lib.llama_model_n_head_kv(m), "n_head": lib.llama_model_n_head(m),
                   "add_bos": bool(lib.llama_vocab_get_add_bos(self.vocab))},
        )

    # --- evaluation ----------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return len(self.tokens)

    def forward(self, tokens: Sequence[int], logits: str | Sequence[bool] = "all") -> np.ndarray:
        """Append tokens to the cache and return logits: "all" → [n, vocab], "last" → [1, vocab],
        "none" → [0, vocab], a bool per token → the rows asked for [sum, vocab]
        (capabilities.row_logits). Long inputs are split into n_batch chunks."""
        self._check_open()
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise EdgespecError(
                f"context full: {len(self.tokens)} + {len(tokens)} tokens > {self.n_ctx}; raise -c/--ctx-size")
        n = len(tokens)
        wanted = [True] * n if logits == "all" else [i == n - 1 for i in range(n)] if logits == "last" else \
            [False] * n if logits == "none" else [bool(w) for w in logits]
        rows = []
        step = self.n_batch
        for start in range(0, n, step):
            out = self._decode(tokens[start : start + step], wanted[start : start + step])
            if out.shape[0]:
                rows.append(out)
        if not rows:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def _decode(self, chunk: Sequence[int], wanted: Sequence[bool]) -> np.ndarray:
        """One llama_decode; the logits of the rows `wanted` [sum(wanted), vocab]."""
        lib, b, n0 = self.lib, self.batch, len(self.tokens)
        n = len(chunk)
        flags = list(wanted) if any(wanted) else [i == n - 1 for i in range(n)]  # as before: one row at least
        for i, tok in enumerate(chunk):
            b.token[i] = tok
            b.pos[i] = n0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = flags[i]
        b.n_tokens = n
        rc = self._llama_decode(b)
        if rc != 0:
            # the cache may hold part of the chunk: drop it so `tokens` stays the truth
            lib.llama_memory_seq_rm(self.mem, 0, n0, -1)
            raise EdgespecError(f"llama_decode failed (code {rc}): {self._log.last()}")
        self.tokens.extend(int(t) for t in chunk)
        if not any(wanted):
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        ptr = lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(sum(flags), self.vocab_size)).copy()

    def forward_tree(self, pending: int, tree: TokenTree) -> np.ndarray:
        """One pass over the pending token and a token tree below it; every node attends to the
        context and its ancestors only. Returns logits [1 + n, vocab]: after the pending token,
        then after each node. Leaf j's branch is sequence j + 1 (context copied into it);
        sequence 0 gets the pending token. Call keep_path() next: it keeps one branch and drops
        the others."""
        self._check_open()
        n = len(tree)
        leaves = [i for i in range(n) if not tree.children(i)]
        if len(leaves) + 1 > self.options.n_seq_max:
            raise EdgespecError(f"a tree of {len(leaves)} leaves needs n_seq_max >= {len(leaves) + 1}")
        if n + 1 > self.n_batch or len(self.tokens) + n + 1 > self.n_ctx:
            raise EdgespecError("the tree does not fit in the batch or the context")
        seqs: list[list[int]] = [[] for _ in range(n)]  # node → the sequences of the leaves below it
        for j, leaf in enumerate(leaves):
            for node in tree.path(leaf):
                seqs[node].append(j + 1)
        lib, b, n0 = self.lib, self.batch, len(self.tokens)
        for s in range(1, len(leaves) + 1):
            lib.llama_memory_seq_cp(self.mem, 0, s, -1, -1)
        rows = [(pending, n0, [0, *range(1, len(leaves) + 1)])]
        rows += [(tree.tokens[i], n0 + tree.depth(i), seqs[i]) for i in range(n)]
        for r, (tok, pos, ids) in enumerate(rows):
            b.token[r], b.pos[r], b.n_seq_id[r], b.logits[r] = tok, pos, len(ids), True
            for k, s in enumerate(ids):
                b.seq_id[r][k] = s
        b.n_tokens = len(rows)
        rc = self._llama_decode(b)
        self._tree = (n0, tree, leaves)
        if rc != 0:
            self.keep_path([])
            lib.llama_memory_seq_rm(self.mem, 0, n0, -1)
            raise EdgespecError(f"llama_decode failed on a tree (code {rc}): {self._log.last()}")
        self.tokens.append(int(pending))
        ptr = lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(len(rows), self.vocab_size)).copy()

    def keep_path(self, path: Sequence[int]) -> None:
        """After forward_tree: keep the nodes of `path` (root's child first) in sequence 0, after
        the pending token, and free every other branch."""
        n0, tree, leaves = self._tree
        lib = self.lib
        if path:
            leaf = next(j for j, f in enumerate(leaves) if path[-1] in tree.path(f))
            lib.llama_memory_seq_cp(self.mem, leaf + 1, 0, n0 + 1, n0 + 1 + len(path))
            self.tokens.extend(int(tree.tokens[i]) for i in path)
        for s in range(1, len(leaves) + 1):
            lib.llama_memory_seq_rm(self.mem, s, -1, -1)
        self._tree = None

    def extend_tree(self, tree: TokenTree, nodes: Sequence[int]) -> np.ndarray:
        """Grow a token tree over several passes (a drafter's best-first search): evaluate `nodes`
        of `tree`, and any ancestor of theirs not evaluated yet, below the cache's last token
        (their root), each attending to the cache and its own ancestors only. Nodes evaluated by
        earlier calls stay in the cache (node i in sequence i + 1, its ancestors' cells tagged with
        it too) and are not evaluated again; `tree` may have grown since (nodes are only ever
        appended). end_tree() frees them. Returns logits [len(nodes), vocab]."""
        self._check_open()
        lib, b, n0 = self.lib, self.batch, len(self.tokens)
        need = sorted({a for i in nodes for a in tree.path(i)} - self._grown)  # parents first
        if need and need[-1] + 2 > self.options.n_seq_max:
            raise EdgespecError(f"a tree of {need[-1] + 1} nodes needs n_seq_max >= {need[-1] + 2}")
        paths = {x: tree.path(x) for x in need}
        if len(need) > self.n_batch or n0 + max((len(p) for p in paths.values()), default=0) > self.n_ctx:
            raise EdgespecError("the tree does not fit in the batch or the context")
        below = {x: [x + 1] for x in need}  # an ancestor evaluated in this pass is seen by its descendants
        for x, path in paths.items():  # each new node's sequence: the context and its evaluated ancestors
            lib.llama_memory_seq_cp(self.mem, 0, x + 1, -1, -1)
            for depth, a in enumerate(path[:-1], start=1):
                if a in self._grown:
                    lib.llama_memory_seq_cp(self.mem, a + 1, x + 1, n0 + depth - 1, n0 + depth)
                else:
                    below[a].append(x + 1)
        want = set(nodes)
        for r, x in enumerate(need):
            b.token[r], b.pos[r], b.n_seq_id[r], b.logits[r] = tree.tokens[x], n0 + len(paths[x]) - 1, len(below[x]), x in want
            for k, s in enumerate(below[x]):
                b.seq_id[r][k] = s
        b.n_tokens = len(need)
        rc = self._llama_decode(b) if need else 0
        if rc != 0:
            for x in need:
                lib.llama_memory_seq_rm(self.mem, x + 1, -1, -1)
            raise EdgespecError(f"llama_decode failed on a tree (code {rc}): {self._log.last()}")
        self._grown.update(need)
        rows = [x for x in need if x in want]  # llama.cpp's output rows, in batch order
        out = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(len(rows), self.vocab_size))
        where = {x: j for j, x in enumerate(rows)}
        missing = [i for i in nodes if i not in where]
        if missing:
            raise EdgespecError(f"extend_tree: nodes {missing} were evaluated by an earlier call")
        return out[[where[i] for i in nodes]].copy()

    def end_tree(self) -> None:
        """After extend_tree: free every node it holds (the cache is the context again)."""
        for x in self._grown:
            self.lib.llama_memory_seq_rm(self.mem, x + 1, -1, -1)
        self._grown = set()

    def truncate(self, n_past: int) -> None:
        """Roll the cache back to its first n_past tokens."""
        self._check_open()
        if n_past < len(self.tokens):
            self.lib.llama_memory_seq_rm(self.mem, 0, n_past, -1)
            del self.tokens[n_past:]


    # --- lifetime ------------------------------------------------------------------------
    def _check_open(self) -> None:
        # after close() the C pointers are dangling: a call would crash the process, not raise
        if self.ctx is None:
            raise EdgespecError(f"the model {os.path.basename(self.facts.path)} was closed")

    def set_threads(self, n: int) -> None:
        """Compute with n threads from the next pass on (the parallel schedule splits the cores
        between a target and a drafter on the same CPU)."""
        self._check_open()
        self.lib.llama_set_n_threads(self.ctx, n, n)
        self.n_threads = n

    def sibling(self) -> "LlamaCppBackend":
        """A second context (own KV cache) on the same weights: close it before this one."""
        return LlamaCppBackend(self.facts.path, self.options, _parent=self)

    def close(self) -> None:
        if getattr(self, "pager", None) is not None:
            self.pager.close()
            self.pager = None
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            if self._parent is None:
                self.lib.llama_model_free(self.model)
            self.ctx = self.model = self.vocab = None


def _block_callback(lib, pager: Callable[[], object]):
    """llama.cpp's eval callback that tells the Pager when a pass has computed block i (the node
    llama.cpp names l_out-i). Asked of every node, it wants only those: the graph is computed in
    one piece per block, and after each the Pager drops that block's streamed weights."""
    from llama_cpp import _ggml

    name_of = _ggml.libggml.ggml_get_name
    name_of.argtypes, name_of.restype = [ctypes.c_void_p], ctypes.c_char_p

    def on_eval(tensor, ask, _user):
        name = name_of(tensor) or b""
        if not name.startswith(b"l_out-"):
            return not ask
        if not ask:
            try:
                p = pager()
                if p is not None:
                    p.layer_done(int(name[6:]))
            except Exception:  # False, or an exception, would stop the pass's compute
                logging.getLogger(__name__).debug("dropping a block behind the pass failed", exc_info=True)
        return True

    return lib.ggml_backend_sched_eval_callback(on_eval)


def _pager(path, header, disk_bytes: int, read_ahead: bool = True, drop_behind: bool = False):
    """Pin all but `disk_bytes` of what every pass reads (paging.py); header: validated, or read here."""
    header = header if header is not None else validate(path)
    every_pass = sum(size for _, size in per_pass_ranges(header))
    return Pager(path, header, max(every_pass - disk_bytes, 0), read_ahead, drop_behind=drop_behind)


FTYPES = {"f16": 1, "bf16": 32, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_m": 12,
          "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}  # llama_ftype values
HEAD_TYPES = {"f16": 1, "q4_0": 2, "q5_0": 6, "q8_0": 8, "q4_k": 12, "q6_k": 14}  # ggml_type values


def quantize(src: str | os.PathLike, dst: str | os.PathLike, ftype: str = "q4_0", threads: int | None = None,
             metadata: dict[str, str] | None = None, head: str | None = None) -> None:
    """Write a (re)quantized copy of a GGUF: e.g. a 4-bit self-drafter of an F16 target.
    `metadata`: string keys written into the copy's GGUF metadata (values up to 127 bytes).
    `head`: the LM head's type (one of HEAD_TYPES); None lets llama.cpp choose (Q6_K for 4-bit)."""
    validate(src)
    if ftype not in FTYPES:
        raise EdgespecError(f"unknown quantization {ftype!r}: use one of {', '.join(FTYPES)}")
    if head is not None and head not in HEAD_TYPES:
        raise EdgespecError(f"unknown LM head type {head!r}: use one of {', '.join(HEAD_TYPES)}")
    lib, log = _init()
    params = lib.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.allow_requantize = True
    if head is not None:
        params.output_tensor_type = HEAD_TYPES[head]
    params.nthread = threads or physical_cores()
    items = list((metadata or {}).items())
    overrides = (lib.llama_model_kv_override * (len(items) + 1))()  # ends with an empty key
    for o, (key, value) in zip(overrides, items):
        k, v = key.encode(), str(value).encode()
        if len(k) >= 128 or len(v) >= 128:
            raise EdgespecError(f"metadata {key!r} is too long for a GGUF override (127 bytes at most)")
        o.tag, o.key, o.value.val_str = lib.LLAMA_KV_OVERRIDE_TYPE_STR, k, v
    if items:
        params.kv_overrides = ctypes.cast(overrides, type(params.kv_overrides))
    if lib.llama_model_quantize(os.fspath(src).encode(), os.fspath(dst).encode(), ctypes.byref(params)) != 0:
        raise EdgespecError(f"quantizing {src} to {ftype} failed: {log.last()}")

