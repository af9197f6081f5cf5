"""Layer-skipping self-drafter (Draft & Verify, Zhang et al. 2023; SWIFT, Xia et al. 2024): the
target with some of its transformer blocks left out.

A block adds its output to the residual stream, so the model without it still runs and still
predicts nearly the same tokens; each draft step reads fewer bytes. It has the target's tokenizer,
so it drafts like any same-vocabulary model, and verification keeps the output exactly the
target's. Built from a high-precision target (F16, BF16, Q8_0) it is first requantized (QuantSpec
and layer skipping together); from a target already at 6 bits or fewer, its own weights are kept.

The file: blocks `blk.N.*` of the kept layers renumbered 0..n-1 in order, `{arch}.block_count`
set to n, per-layer metadata arrays cut the same way; `edgespec.drafter.skipped_layers` names the
source's layers left out.

Which layers, by measurement on the calibration replies (`trim.calibration_texts`). The reference
is the source's own greedy token at each position, teacher-forced; a skip set's *agreement* is the
share of positions where the skipped model's argmax is that token, which is its per-token
acceptance at T = 0 (alpha below). Split the replies in two slices:

  1. rank: leave each layer out alone (never the first or the last) and score it on the probe
     slice; ties in agreement go by the mean log-probability of the reference token;
  2. for each candidate count n (SkipSettings.count_fractions of the layers), leave out the n
     layers whose loss hurt least, and measure the agreement on the held-out slice;
  3. keep the n with the best predicted tokens/s: the planner's rate for a draft of k tokens,
     (1 - alpha^(k+1)) / (1 - alpha) tokens per (k drafter steps + one target pass over k + 1),
     with the drafter's step cost from the cost model (bytes read: fewer layers, fewer bytes).

A requantized build searches on its 4-bit copy (made once, first); the reference stays the
source's. Every candidate is a GGUF on disk for llama.cpp: one scratch file in a temporary folder
beside the output, removed when the build ends; between leave-one-out candidates only the block
that differs is rewritten in place (Scratch).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions, LlamaVocab, quantize
from edge_spec.backends.trimmed import TrimmedBackend, piece_of
from edge_spec.build.rewrite import rewrite
from edge_spec.build.trim import CALIBRATION, calibration_texts
from edge_spec.models.chat_template import chat_tokens, renderer_for
from edge_spec.models.gguf_file import ArrayInfo, validate
from edge_spec.models.provenance import kept_ids
from edge_spec.models.shape import model_shape
from edge_spec.plan import planner
from edge_spec.plan.choose import machine_profile
from edge_spec.types import EdgespecError

Report = Callable[[str, float], None]
SKIPPED_KEY = "edgespec.drafter.skipped_layers"
# llama.cpp picks these architectures' layer kinds (sliding-window or full attention, RoPE or NoPE,
# dense or MoE FFN) from the layer's index, so a renumbered layer would change kind
INDEXED_LAYER_KINDS = frozenset({"gemma2", "gemma3", "gemma3n", "cohere2", "llama4", "smollm3", "gpt-oss", "exaone4"})
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


@dataclass(frozen=True)
class SkipSettings:
    """The layer search's sizes, in one place."""

    probe_tokens: int = 256          # reply positions for the leave-one-out ranking
    held_out_tokens: int = 768       # reply positions for each candidate count's agreement
    count_fractions: tuple[float, ...] = (1 / 8, 1 / 4, 3 / 8)  # candidate counts, as shares of the layers
    max_item_tokens: int = 512       # prompt + reply, per calibration item


@dataclass(frozen=True)
class Score:
    agreement: float  # share of positions where the argmax is the reference token (alpha at T = 0)
    log_p: float      # mean log-probability of the reference token (finer, breaks ties)


# --- the file --------------------------------------------------------------------------------------

def check_layers(skip: Sequence[int], n_layers: int) -> tuple[int, ...]:
    """The layers to skip, sorted; EdgespecError for a set that cannot make a drafter."""
    skip = [int(i) for i in skip]
    if not skip:
        raise EdgespecError("no layers to skip: give --layers, e.g. --layers 3,5, or leave it out to choose by measuring")
    if len(set(skip)) != len(skip):
        raise EdgespecError(f"--layers names a layer twice: {','.join(map(str, skip))}")
    outside = [i for i in skip if not 0 <= i < n_layers]
    if outside:
        raise EdgespecError(f"--layers {','.join(map(str, outside))}: this model has layers 0..{n_layers - 1}")
    if len(skip) == n_layers:
        raise EdgespecError(f"--layers names all {n_layers} layers: a drafter needs some of them")
    if 0 in skip or n_layers - 1 in skip:
        raise EdgespecError(f"the first and last layers (0 and {n_layers - 1}) are always kept: "
                            f"skip layers from 1..{n_layers - 2}")
    return tuple(sorted(skip))


def check_source(header) -> int:
    """The source's layer count, after checking that its layers can be left out."""
    md = header.metadata
    arch = md["general.architecture"]
    pattern = md.get(f"{arch}.attention.sliding_window_pattern")
    if arch in INDEXED_LAYER_KINDS or (md.get(f"{arch}.attention.sliding_window") and not isinstance(pattern, list)):
        raise EdgespecError(f"layer skipping does not support {arch} models: llama.cpp chooses their layers' "
                            "attention by layer index, which leaving a layer out would shift. Use --method quant or trim")
    n_layers = int(md[f"{arch}.block_count"])
    if n_layers < 3:
        raise EdgespecError(f"{Path(header.path).name} has {n_layers} layers: none can be skipped "
                            "(the first and last are always kept)")
    return n_layers


def write_skipped(source: str | os.PathLike, out: str | os.PathLike, skip: Sequence[int], metadata: dict,
                  progress: Callable[[float], None] | None = None) -> None:
    """Copy `source` to `out` without the blocks in `skip` (which may be empty: a plain copy),
    recording them in SKIPPED_KEY."""
    header = validate(source)
    if skip:  # GGUF has no empty arrays
        n_layers = _n_layers(header)
        check_layers(skip, n_layers)
        metadata = metadata | {SKIPPED_KEY: np.array(sorted(skip), dtype=np.int64),
                               "edgespec.drafter.source_layers": n_layers}
    _write(header, out, skip, metadata, progress)


def _n_layers(header) -> int:
    return int(header.metadata[f"{header.metadata['general.architecture']}.block_count"])


def _position(name: str) -> int:
    """Where a tensor goes in the copy: the other tensors first, then block by block. Any skip
    set of the same size then gives the same layout (the source's order may be blk.0, blk.1,
    blk.10, ...), which is what lets Scratch patch a file in place."""
    block = _BLOCK.fullmatch(name)
    return -1 if block is None else int(block[1])


def _renamed(header, skip: Sequence[int]) -> list[tuple[str, object]]:
    """The tensors of the copy in file order: (name in the copy, the source's TensorInfo)."""
    kept = [i for i in range(_n_layers(header)) if i not in set(skip)]
    renumber = {old: new for new, old in enumerate(kept)}
    out = []
    for t in header.tensors:
        block = _BLOCK.fullmatch(t.name)
        if block is None:
            out.append((t.name, t))
        elif int(block[1]) in renumber:
            out.append((f"blk.{renumber[int(block[1])]}.{block[2]}", t))
    return sorted(out, key=lambda renamed: _position(renamed[0]))


def _per_layer(name: str, value, arch: str, n_layers: int) -> bool:
    """A metadata array of one hyperparameter per layer (some architectures vary head counts)."""
    length = value.count if isinstance(value, ArrayInfo) else len(value) if isinstance(value, (list, np.ndarray)) else -1
    return name.startswith(f"{arch}.") and length == n_layers


def _write(header, out, skip: Sequence[int], metadata: dict, progress=None) -> None:
    arch, n_layers = header.metadata["general.architecture"], _n_layers(header)
    kept = [i for i in range(n_layers) if i not in set(skip)]
    names = {t.name: name for name, t in _renamed(header, skip)}

    def edit_key(name: str, value):
        if name == f"{arch}.block_count":
            return len(kept)
        if name == f"{arch}.leading_dense_block_count":  # the first N layers have a dense FFN
            return value - sum(1 for i in skip if i < value)
        return [value[i] for i in kept] if _per_layer(name, value, arch, n_layers) else value

    def edit_tensor(t, rows: np.ndarray):
        return (names[t.name], rows) if t.name in names else None

    rewrite(header, out, metadata, edit_key=edit_key, edit_tensor=edit_tensor, order=_position, progress=progress)


class Scratch:
    """One candidate GGUF on disk, rewritten for each skip set. When the new set's tensors line up
    with the file's (the same names, shapes and types in the same order, as when layer 5 is left
    out instead of layer 4), only the tensors whose source changed are copied, in place: one
    block's bytes instead of the whole model."""

    def __init__(self, base, path: Path):
        self.header, self.path = validate(base), path
        md, n = self.header.metadata, _n_layers(self.header)
        # per-layer metadata changes with the set: such a model is always written whole
        self.rewrite_always = any(_per_layer(k, v, md["general.architecture"], n) for k, v in md.items())
        self.written: list | None = None  # _renamed() of what the file holds
        self.offsets: list[int] = []      # where the file's tensors start

    def write(self, skip: Sequence[int]) -> Path:
        plan = _renamed(self.header, skip)

        def layout(tensors):
            return [(name, t.shape, t.type) for name, t in tensors]

        if self.rewrite_always or self.written is None or layout(plan) != layout(self.written):
            _write(self.header, self.path, skip, {})
            copy = validate(self.path)
            self.offsets = [copy.data_offset + t.offset for t in copy.tensors]
        else:
            src_start = self.header.data_offset
            with open(self.header.path, "rb") as src, open(self.path, "r+b") as dst:
                for (_, t), (_, old), at in zip(plan, self.written, self.offsets):
                    if t != old:
                        src.seek(src_start + t.offset)
                        dst.seek(at)
                        dst.write(src.read(t.n_bytes))
        self.written = plan
        return self.path


# --- measuring agreement -----------------------------------------------------------------------------

def calibration_slices(model, texts: Sequence[tuple[str, str]], sizes: Sequence[int],
                       max_item_tokens: int) -> list[list[tuple[list[int], int]]]:
    """Disjoint slices of the calibration replies, each of at least `sizes[i]` reply positions
    (fewer if the replies run out), as (tokens, start): the logits after tokens[start] onward
    are scored. The texts are dealt in order, round-robin to the slices not yet full."""
    with renderer_for(model) as templates:  # one template renderer for every prompt
        return _deal(model, texts, sizes, max_item_tokens, lambda m: chat_tokens(model, m, templates))


def _deal(model, texts, sizes, max_item_tokens: int, chat) -> list[list[tuple[list[int], int]]]:
    slices: list[list] = [[] for _ in sizes]
    have = [0] * len(sizes)
    turn = 0
    for prompt, reply in texts:
        open_ = [s for s in range(len(sizes)) if have[s] < sizes[s]]
        if not open_:
            break
        s = open_[turn % len(open_)]
        turn += 1
        if prompt:
            head = chat([{"role": "user", "content": prompt}])
            body = model.tokenize(reply, add_special=False, parse_special=False)
        else:
            head, body = [], model.tokenize(reply, add_special=True, parse_special=False)
        tokens = (head + body)[:max_item_tokens]
        start = max(len(head) - 1, 0)  # the logits after the last prompt token predict the first reply token
        if len(tokens) - start < 2:
            continue
        slices[s].append((tokens, start))
        have[s] += len(tokens) - start
    return slices


def _teacher_forced(model, items):
    """Per item: the model's logits at each scored position, [n, vocab]."""
    for tokens, start in items:
        model.truncate(0)
        model.forward(tokens[:start], logits="none")
        yield model.forward(tokens[start:], logits="all")
    model.truncate(0)


def greedy_tokens(model, items) -> list[np.ndarray]:
    """The reference: the model's argmax at each scored position of each item."""
    return [rows.argmax(axis=1) for rows in _teacher_forced(model, items)]


def score(model, items, reference: Sequence[np.ndarray], kept: np.ndarray | None = None) -> Score:
    """`model`'s agreement with the reference tokens. `kept`: a trimmed drafter's target id per
    row (its rows cover only those tokens; a reference token outside them is a miss, and its
    log-probability is -inf)."""
    hits = total = 0
    log_p = 0.0
    row_of = None
    if kept is not None:
        row_of = np.full(max(int(kept.max()), *(int(w.max(initial=0)) for w in reference)) + 1, -1, dtype=np.int64)
        row_of[kept] = np.arange(len(kept))
    for rows, want in zip(_teacher_forced(model, items), reference):
        rows = rows.astype(np.float64)
        top = rows.max(axis=1)
        log_norm = top + np.log(np.exp(rows - top[:, None]).sum(axis=1))
        picked, at = rows.argmax(axis=1), want
        if row_of is not None:
            picked = kept[picked]
            at = row_of[want]
        hits += int((picked == want).sum())
        got = rows[np.arange(len(want)), np.maximum(at, 0)] - log_norm
        log_p += float(np.where(at >= 0, got, -np.inf).sum())
        total += len(want)
    return Score(hits / max(total, 1), log_p / max(total, 1))


class Candidates:
    """Scores skip sets of `base` against the reference, each written to one Scratch file."""

    def __init__(self, base, scratch: Path, n_ctx: int, slices: dict, reference: dict):
        self.base, self.scratch, self.n_ctx = base, Scratch(base, scratch), n_ctx
        self.slices, self.reference = slices, reference

    def score(self, skip: Sequence[int], where: str) -> Score:
        path = self.scratch.write(skip) if skip else self.base
        with LlamaCppBackend(path, LlamaOptions(n_ctx=self.n_ctx)) as model:
            return score(model, self.slices[where], self.reference[where])


# --- choosing the layers --------------------------------------------------------------------------

def candidate_counts(n_layers: int, fractions: Sequence[float]) -> list[int]:
    return sorted({min(max(1, round(n_layers * f)), n_layers - 2) for f in fractions})


def without_layers(shape, skip: Sequence[int]):
    """The cost model's shape of `shape` with the layers in `skip` left out."""
    kept = [b for i, b in enumerate(shape.layer_bytes) if i not in set(skip)]
    share = sum(kept) / max(sum(shape.layer_bytes), 1)
    return dataclasses.replace(shape, path=f"{shape.path}.skip-{len(skip)}", n_layers=len(kept),
                               layer_bytes=tuple(kept), layer_params=int(shape.layer_params * share),
                               file_bytes=shape.file_bytes - sum(shape.layer_bytes) + sum(kept))


def predicted_rates(target_shape, drafter_shape, alpha: float) -> tuple[float, float]:
    """(draft tokens/s, plain tokens/s) the planner predicts on this machine (CPU) at acceptance alpha."""
    plan = planner.plan(target_shape, machine_profile(None), drafter_shape, gpu=False,
                        knowledge=planner.Knowledge(alpha, "measured agreement"))
    draft = max((a.tokens_per_second for a in plan.alternatives if a.strategy == "draft"), default=0.0)
    return draft, plan.plain.tokens_per_second


def choose_layers(candidates: Candidates, n_layers: int, target_shape, base_shape, base_score: Score,
                  settings: SkipSettings, report: Report) -> tuple[tuple[int, ...], Score, list[str], list[str]]:
    """Steps 1-3 of the module docstring. Returns the layers, their held-out score, one line per
    candidate count (the table), and each layer's leave-one-out agreement."""
    inner = range(1, n_layers - 1)
    alone = {}
    for n, layer in enumerate(inner):
        report("ranking layers (each left out alone)", n / len(inner))
        alone[layer] = candidates.score((layer,), "probe")
    report("ranking layers (each left out alone)", 1.0)
    least_needed = sorted(inner, key=lambda i: (-alone[i].agreement, -alone[i].log_p, i))
    counts = candidate_counts(n_layers, settings.count_fractions)
    rows = {0: ((), base_score)}
    for n, count in enumerate(counts):
        report("measuring skip sets", n / len(counts))
        skip = tuple(sorted(least_needed[:count]))
        rows[count] = (skip, candidates.score(skip, "held_out"))
    report("measuring skip sets", 1.0)
    speed = {count: predicted_rates(target_shape, without_layers(base_shape, skip), s.agreement)
             for count, (skip, s) in rows.items()}
    best = max(counts, key=lambda c: (speed[c][0], -c))
    lines = [f"skip {c} ({','.join(map(str, skip)) or 'none'}): held-out agreement {s.agreement:.3f}, "
             f"{speed[c][0]:.1f} tok/s predicted ({speed[c][0] / speed[c][1]:.2f}x plain)"
             + (" (chosen)" if c == best else "")
             + (" (predicted faster: layer skipping does not pay here, use --method quant)"
                if c == 0 and speed[0][0] > speed[best][0] else "")
             for c, (skip, s) in rows.items()]
    per_layer = [f"{i}:{alone[i].agreement:.3f}" for i in inner]
    return rows[best][0], rows[best][1], lines, per_layer


def build_skipped(source, out, layers: Sequence[int] | None, calibration, metadata: dict, report: Report,
                  bits: str | None = None, settings: SkipSettings = SkipSettings()) -> None:
    """Requantize `source` to `bits` (None: keep its weights), choose the layers (or take
    `layers`), write the skipped copy to `out`. The reference tokens are always the source's."""
    n_layers = check_source(validate(source))
    layers = check_layers(layers, n_layers) if layers is not None else None
    texts = calibration_texts(calibration)
    work = Path(tempfile.mkdtemp(prefix=".edgespec-skip-", dir=Path(out).parent))
    try:
        base = source
        if bits is not None:  # once, first: the search then reads the smaller copy
            report(f"quantizing to {bits}", 0.0)
            base = work / f"base-{bits}.gguf"
            quantize(source, base, bits)
            report(f"quantizing to {bits}", 1.0)
        slices, reference = _reference(source, _dealt(texts, len(calibration_texts())), settings,
                                       rank=layers is None, report=report)
        candidates = Candidates(base, work / "candidate.gguf", settings.max_item_tokens + 8, slices, reference)
        # the base without skipping; the source agrees with itself by definition
        base_score = Score(1.0, 0.0) if bits is None else candidates.score((), "held_out")
        shapes = model_shape(source), model_shape(base)
        if layers is None:
            layers, chosen, lines, per_layer = choose_layers(candidates, n_layers, *shapes, base_score, settings, report)
        else:
            report("measuring the given layers", 0.0)
            chosen, per_layer = candidates.score(layers, "held_out"), []
            rate, plain = predicted_rates(shapes[0], without_layers(shapes[1], layers), chosen.agreement)
            lines = [f"skip 0 (none): held-out agreement {base_score.agreement:.3f}"] if bits else []
            lines.append(f"skip {len(layers)} ({','.join(map(str, layers))}, given): held-out agreement "
                         f"{chosen.agreement:.3f}, {rate:.1f} tok/s predicted ({rate / plain:.2f}x plain)")
        positions = {where: sum(len(t) - s for t, s in items) for where, items in slices.items()}
        metadata = metadata | {
            "edgespec.drafter.quantization": bits or f"as the source ({Path(source).name[:80]})",
            "edgespec.drafter.calibration": f"{len(texts)} replies ({CALIBRATION.name}"
                                            + (f" + {Path(calibration).name})" if calibration else ")")
                                            + f": {positions['probe']} positions to rank, {positions['held_out']} held out",
            "edgespec.drafter.agreement": float(chosen.agreement),
            "edgespec.drafter.skip_choice": "; ".join(lines),
        } | ({"edgespec.drafter.layer_agreement": " ".join(per_layer)} if per_layer else {})
        what = f"writing {n_layers - len(layers)} of {n_layers} layers"
        report(what, 0.0)
        write_skipped(base, out, layers, metadata, lambda f: report(what, f))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def agreement(source, drafter, calibration=None, report: Report | None = None,
              settings: SkipSettings = SkipSettings()) -> tuple[Score, str]:
    """How often `drafter`'s argmax is `source`'s greedy token on the held-out slice of the
    calibration replies (its acceptance at T = 0, alpha), and a line saying what it was measured
    on: what the quant builder records (and the trim builder, for a requantized copy of the target
    counted with itself), so the planner weighs a self-drafter by its own agreement."""
    report = report or (lambda what, fraction: None)
    texts = calibration_texts(calibration)
    slices, reference = _reference(source, _dealt(texts, len(calibration_texts())), settings, rank=False, report=report)
    report("measuring the drafter's agreement", 0.0)
    kept = kept_ids(drafter)  # a trimmed copy (trim + QuantSpec) is read in the source's ids
    with LlamaCppBackend(drafter, LlamaOptions(n_ctx=settings.max_item_tokens + 8)) as model:
        if kept is None:
            measured = score(model, slices["held_out"], reference["held_out"])
        else:
            vocab = LlamaVocab(os.fspath(source))
            try:
                seen = TrimmedBackend(model, kept, vocab.n_tokens, piece_of(vocab))
                measured = score(seen, slices["held_out"], reference["held_out"], kept)
            finally:
                vocab.close()
    report("measuring the drafter's agreement", 1.0)
    positions = sum(len(t) - s for t, s in slices["held_out"])
    return measured, (f"{len(texts)} replies ({CALIBRATION.name}" + (f" + {Path(calibration).name})" if calibration else ")")
                      + f": {positions} positions held out")


def _dealt(texts: list, shipped: int) -> list:
    """The user's texts (after the `shipped` ones) first, then the shipped replies, each shuffled
    (fixed seed): the order calibration_slices deals them in."""
    rng = np.random.default_rng(0)
    return [texts[i] for i in [*(shipped + rng.permutation(len(texts) - shipped)), *rng.permutation(shipped)]]


def _reference(source, texts, settings: SkipSettings, rank: bool, report: Report) -> tuple[dict, dict]:
    """The probe slice (only to `rank` layers) and the held-out slice, and the source's greedy
    tokens on each."""
    report("the source's greedy tokens", 0.0)
    with LlamaCppBackend(source, LlamaOptions(n_ctx=settings.max_item_tokens + 8)) as model:
        sizes = (settings.probe_tokens if rank else 0, settings.held_out_tokens)
        slices = dict(zip(("probe", "held_out"), calibration_slices(model, texts, sizes, settings.max_item_tokens)))
        reference = {where: greedy_tokens(model, items) for where, items in slices.items()}
    report("the source's greedy tokens", 1.0)
    return slices, reference
