"""Drafters built from the target itself, with their provenance in the GGUF metadata.

QuantSpec-style self-drafter (`method="quant"`): the target's own weights requantized to 4 bits
(or 3, or 2) with llama.cpp's quantizer. It shares the target's tokenizer and nearly its
predictions, so it is accepted far more often than a smaller model; it pays when the target is
high precision (F16, BF16, Q8_0), whose steps cost several times its low-bit copy's. Its agreement
with the target (argmax equal to the target's greedy token on held-out calibration replies) is
measured as it is built and recorded, so the planner weighs it by what it measured, not a prior.

VocabTrim drafter (`method="trim"`, see build/trim.py): a smaller model (or the target) with
its LM head cut to the K tokens the target produces most; q is zero outside them, so verification
stays lossless, and each draft step reads far fewer bytes.

Layer-skipping self-drafter (`method="skip"`, see build/skip.py): the target without the blocks
whose absence changes its greedy tokens least (measured on the calibration replies), requantized
first when the target is high precision. Same tokenizer as the target, fewer bytes per step.

Every built file carries `edgespec.drafter.*` keys (edge_spec.models.provenance, which
`edgespec drafter info`, the planner and the engine read).
The output appears under its final name only when complete (written as NAME.partial, renamed).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge_spec.backends.llama_cpp import quantize
from edge_spec.build.rewrite import DROP, rewrite
from edge_spec.build.skip import SkipSettings, agreement, build_skipped, check_layers, check_source
from edge_spec.build.trim import build_trimmed
from edge_spec.defaults import MIN_SOURCE_BITS, SELF_DRAFTER_KV, SELF_DRAFTER_PRIOR, SELF_DRAFTER_PRIORS
from edge_spec.models.gguf_file import validate
from edge_spec.models.provenance import METHOD_NAMES, METHODS, PREFIX, default_output
from edge_spec.plan.costmodel import BITS, RUNTIME_BYTES, source_bits
from edge_spec.plan.planner import RAM_HEADROOM
from edge_spec.types import EdgespecError

if TYPE_CHECKING:
    from edge_spec.build.skip import SkipSettings

Progress = Callable[[str, float], None]


def build(source: str | os.PathLike, method: str = "quant", out: str | os.PathLike | None = None,
          bits: str | None = None, force: bool = False, progress: Progress | None = None, *,
          keep: int | None = None, target: str | os.PathLike | None = None,
          calibration: str | os.PathLike | None = None, layers: Sequence[int] | None = None,
          search: SkipSettings | None = None, memory_budget: int | None = None) -> Path:
    """Build a drafter from `source`; returns its path. Refuses an existing output without force.

    trim: `keep` tokens (None: chosen by measuring), counted with `target` (None: the source
    itself) over the shipped calibration replies plus the text file `calibration`; with `bits`,
    the trimmed copy is requantized too (its head kept at 8 bits).
    quant and skip: `bits` None means q4_0.
    quant, and trim with `bits` of a high-precision source counted with itself (a self-drafter
    with a cut head): the copy's agreement with the source (skip.agreement, on the same replies
    plus `calibration`) is measured and recorded, for the planner to weigh it by.
    `memory_budget`: refuse a drafter that could not run within these bytes (next to anything).
    skip: leaves out `layers` (None: chosen by measuring on the same replies, with the sizes in
    `search`, a skip.SkipSettings); a source above MIN_SOURCE_BITS is requantized to `bits` first,
    any other keeps its weights."""
    report = progress or (lambda what, fraction: None)
    if method not in METHODS:
        raise EdgespecError(f"unknown drafter method {method!r}: use one of {', '.join(METHODS)}")
    if method != "trim":
        bits = bits or "q4_0"
    if bits is not None and bits not in BITS:
        raise EdgespecError(f"unknown drafter quantization {bits!r}: use one of {', '.join(BITS)}")
    header = validate(source)
    have = source_bits(source)
    requantize = method == "quant" or (method == "skip" and have > MIN_SOURCE_BITS)
    if method == "skip":
        n_layers = check_source(header)
        if layers is not None:
            check_layers(layers, n_layers)  # before the long part
    if method == "quant" and have <= MIN_SOURCE_BITS:
        raise EdgespecError(
            f"{Path(source).name} is already {have:.1f} bits per weight: a {bits} copy would be no cheaper "
            "to run. A self-drafter pays for F16, BF16 or Q8_0 targets; for this one use a smaller model (-md)")
    out = Path(out) if out is not None else default_output(source, method, bits)
    if out.exists() and not force:
        raise EdgespecError(f"{out} exists: give another -o path, or --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # skip also holds a scratch candidate and, when requantizing, the requantized copy
    requantize = requantize or (method == "trim" and bits is not None)
    copies = {"quant": 2, "trim": 2 if requantize else 1, "skip": 3 if requantize else 2}[method]
    size = header.file_size * (BITS[bits] / have if requantize else 1.0) * 1.05
    need, what = size * copies, f"{copies} copies of {size / 2**30:.2f} GiB"
    self_copy = method == "trim" and _self_copy(source, target, bits)
    if method == "trim" and requantize:  # the trimmed copy is written at the source's precision first
        copies = 2 if self_copy else 1  # a self-copy is measured, then rewritten
        need = header.file_size * 1.05 + size * copies
        what = f"the trimmed copy at the source's precision, then {copies} of {size / 2**30:.2f} GiB"
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise EdgespecError(f"{out.parent} has {free / 2**30:.2f} GiB free; building the drafter needs about "
                            f"{need / 2**30:.2f} GiB ({what})")
    usable = memory_budget * RAM_HEADROOM - RUNTIME_BYTES if memory_budget is not None else None
    if usable is not None and size > usable:
        raise EdgespecError(f"a {bits or 'copy'} drafter of {Path(source).name} would take about {size / 2**30:.2f} GiB, "
                            f"more than the {memory_budget / 2**30:.2f} GiB memory budget leaves a drafter "
                            f"({max(usable, 0) / 2**30:.2f} GiB): "
                            "choose fewer --bits or a bigger budget")

    digest = _sha256(source, lambda f: report("hashing the source", f))
    metadata = {
        PREFIX + "method": METHOD_NAMES[method],
        PREFIX + "source": Path(source).name[:120],
        PREFIX + "source_sha256": digest,
        PREFIX + "created": datetime.date.today().isoformat(),
        PREFIX + "edgespec_version": _version(),
    }
    partial = out.with_name(out.name + ".partial")
    scratch = out.with_name(out.name + ".unmeasured")  # a copy measured before its provenance is written
    try:
        if method == "quant":
            report(f"quantizing to {bits}", 0.0)
            quantize(source, scratch, bits)
            report(f"quantizing to {bits}", 1.0)
            _write_measured(source, scratch, partial, calibration, report,
                            metadata | {PREFIX + "quantization": bits}, on_key=PREFIX + "calibration")
        elif self_copy:
            # trim + QuantSpec from the target itself: a self-drafter whose head (the biggest
            # tensor a draft step reads) is cut; measured like a quant copy, for the planner
            build_trimmed(source, scratch, keep, target, calibration, metadata, report, bits,
                          acceptance=SELF_DRAFTER_PRIORS.get(bits, SELF_DRAFTER_PRIOR), memory_budget=memory_budget)
            _write_measured(source, scratch, partial, calibration, report, {}, on_key=PREFIX + "agreement_on")
        elif method == "trim":
            build_trimmed(source, partial, keep, target, calibration, metadata, report, bits,
                          memory_budget=memory_budget)
        else:
            build_skipped(source, partial, layers, calibration, metadata, report, bits if requantize else None,
                          search or SkipSettings())
        validate(partial)  # a disk that filled up or a crash leaves no half file under `out`
        os.replace(partial, out)
    finally:
        for leftover in (partial, scratch):
            if leftover.is_file():
                leftover.unlink()
    return out


def _write_measured(source, scratch: Path, partial: Path, calibration, report: Progress, keys: dict,
                    on_key: str) -> None:
    """Measure the copy `scratch`'s agreement with `source` and write it to `partial` with `keys`,
    its KV cache and the agreement (what it was measured on under `on_key`), replacing any of
    those keys the copy already carries."""
    measured, on = agreement(source, scratch, calibration, report)
    added = keys | {PREFIX + "kv_cache": SELF_DRAFTER_KV, PREFIX + "agreement": float(measured.agreement), on_key: on}
    try:
        rewrite(validate(scratch), partial, added, edit_key=lambda name, value: DROP if name in added else value,
                progress=lambda f: report("writing the drafter", f))
    except OSError as e:
        raise EdgespecError(f"could not write {partial}: {e.strerror or e}") from None


def _self_copy(source, target, bits: str | None) -> bool:
    """A trimmed build that is a self-drafter: requantized from a high-precision source and
    counted with that source itself (no other target)."""
    same = target is None or os.path.realpath(target) == os.path.realpath(source)
    return bits is not None and same and source_bits(source) > MIN_SOURCE_BITS


def _sha256(path: str | os.PathLike, progress: Callable[[float], None], chunk: int = 8 << 20) -> str:
    h, size, done = hashlib.sha256(), os.path.getsize(path), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            done += len(block)
            progress(done / max(size, 1))
    return h.hexdigest()


def _version() -> str:
    """edgespec's version as installed (the builders sit below the package's root, which
    re-exports the API)."""
    try:
        return importlib.metadata.version("edgespec")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
