"""VocabTrim / FR-Spec: a drafter whose LM head covers only the K tokens the target produces most.

On the edge a small drafter's step is dominated by its LM head when the vocabulary is large
(Qwen2.5-Coder-0.5B: the 151,936-row head is 36% of the bytes a step reads; Gemma 3 270M: 70%).
Trimming it to the top-K rows makes each draft step cheaper; verification stays exactly lossless
because the drafter's q is zero outside the kept set and the verifier works over the target's
full vocabulary (a token the drafter cannot propose is still produced by the residual).

The trimmed drafter is a valid GGUF with a K-token vocabulary: the token embeddings and the output
rows of the kept tokens, the tokenizer arrays cut to them (merges that stay inside the set), special
token ids renumbered, and the target id of every drafter id in `edgespec.drafter.kept_ids`. At
run time `edge_spec.backends.trimmed.TrimmedBackend` shows it to the runtime in the target's ids: a context token outside
the set is re-encoded with the drafter's own (trimmed) tokenizer from the token's bytes, and the
drafter's logits are over the K kept tokens, `kept_ids[i]` being the target token of row i.

Which tokens: the target's next-token distributions (at the default sampling settings) summed over
its own replies to the shipped calibration prompts (`edge_spec/data/calibration.json`, plus any text
of the user's), ties broken by token id (BPE ids follow merge order, i.e. corpus frequency). Kept
always: control tokens the chat template or the metadata names, and the byte tokens, so any text
can still be fed. K is chosen by measuring: the calibration replies are split in two, one half
ranks the tokens, the other measures how often the target's top token falls outside each
candidate K (the acceptance a trimmed drafter loses at T = 0 is at most that), and the planner
predicts tokens/s for each K from the drafter's cost at that head size; the best K wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions, quantize
from edge_spec.build.rewrite import DROP, rewrite
from edge_spec.core.sampling import probs
from edge_spec.defaults import PRIOR_ACCEPTANCE
from edge_spec.models.chat_template import chat_tokens, renderer_for
from edge_spec.models.gguf_file import array_values, validate
from edge_spec.models.provenance import KEPT_KEY, PREFIX
from edge_spec.models.registry import state_dir
from edge_spec.models.shape import model_shape
from edge_spec.plan import planner
from edge_spec.plan.choose import machine_profile
from edge_spec.plan.costmodel import BITS, source_bits, trimmed_shape
from edge_spec.plan.history import History
from edge_spec.types import EdgespecError, SamplingParams

CALIBRATION = Path(__file__).resolve().parent.parent / "data" / "calibration.json"
CANDIDATE_K = (8192, 12288, 16384, 24576, 32768, 49152, 65536, 98304)
MIN_K = 1024
CONTROL, BYTE, USER_DEFINED = 3, 6, 4  # llama.cpp token types
VOCAB_TENSORS = ("token_embd.weight", "output.weight")


@lru_cache(maxsize=1)
def _byte_chars() -> tuple[str, ...]:
    """GPT-2 byte-level BPE's printable character for each byte value 0..255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return tuple(chars[b] for b in range(256))


@dataclass(frozen=True)
class Vocab:
    """The parts of a GGUF tokenizer that trimming needs."""

    model: str               # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    types: np.ndarray        # llama.cpp token types
    special_ids: dict        # metadata key -> id, e.g. tokenizer.ggml.eos_token_id
    chat_template: str
    scores: np.ndarray | None = None  # SentencePiece piece scores (higher = more frequent)

    @property
    def size(self) -> int:
        return len(self.tokens)

    def byte_tokens(self) -> np.ndarray:
        """Ids of the single-byte tokens (every text can be spelled with them). Some vocabularies
        lack a few (SmolLM2: control bytes such as 0x04), which the model cannot read anyway."""
        if self.model == "gpt2":
            index = {t: i for i, t in enumerate(self.tokens) if len(t) == 1}
            wanted = _byte_chars()
        elif self.model == "llama":
            index = {t: i for i, t in enumerate(self.tokens) if self.types[i] == BYTE}
            wanted = tuple(f"<0x{b:02X}>" for b in range(256))
        else:
            raise EdgespecError(f"vocabulary trimming supports BPE (gpt2) and SentencePiece (llama) "
                                f"tokenizers, not {self.model!r}")
        found = [index[w] for w in wanted if w in index]
        if len(found) < 192:
            raise EdgespecError(f"this {self.model} vocabulary has only {len(found)} of the 256 byte tokens: "
                                "trimming it would leave text that cannot be fed to the drafter")
        return np.array(found, dtype=np.int64)

    def forced(self) -> np.ndarray:
        """Tokens every trimmed vocabulary keeps: bytes, the metadata's special ids, and control
        or user-defined tokens that appear in the chat template."""
        ids = set(self.byte_tokens().tolist()) | set(self.special_ids.values())
        for i in np.flatnonzero((self.types == CONTROL) | (self.types == USER_DEFINED)):
            if self.tokens[i] and self.tokens[i] in self.chat_template:
                ids.add(int(i))
        return np.array(sorted(i for i in ids if 0 <= i < self.size), dtype=np.int64)


def read_vocab(path: str | os.PathLike) -> Vocab:
    header = validate(path)
    md = header.metadata
    if "tokenizer.ggml.tokens" not in md:
        raise EdgespecError(f"{path} has no tokenizer.ggml.tokens: nothing to trim")
    tokens = array_values(header, "tokenizer.ggml.tokens")
    types = array_values(header, "tokenizer.ggml.token_type") if "tokenizer.ggml.token_type" in md \
        else np.ones(len(tokens), dtype=np.int32)
    scores = array_values(header, "tokenizer.ggml.scores") if "tokenizer.ggml.scores" in md else None
    specials = {k: int(v) for k, v in md.items() if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")}
    return Vocab(md.get("tokenizer.ggml.model", ""), tokens, np.asarray(types), specials,
                 md.get("tokenizer.chat_template", "") or "", scores)


# --- which tokens the target produces ---------------------------------------------------------

def calibration_texts(extra: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(prompt, reply) pairs: the shipped target replies, then the user's text in ~2 KB pieces
    (as replies to an empty prompt)."""
    items = [(i["prompt"], i["reply"]) for i in json.loads(CALIBRATION.read_text())["items"]]
    if extra is not None:
        try:
            text = Path(extra).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise EdgespecError(f"calibration file {extra} is not UTF-8 text") from None
        except OSError as e:
            raise EdgespecError(f"cannot read calibration file {extra}: {e.strerror}") from None
        if not text.strip():
            raise EdgespecError(f"calibration file {extra} is empty")
        pieces = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
        chunk, chunks = "", []
        for p in pieces:
            chunk = f"{chunk}\n\n{p}" if chunk else p
            if len(chunk) > 2000:
                chunks.append(chunk)
                chunk = ""
        chunks += [chunk] if chunk else []
        items += [("", c) for c in chunks]
    return items


def cached_counts(target, items: Sequence[tuple[str, str]], progress: Callable[[float], None] | None = None,
                  cache: Path | None = None) -> list[np.ndarray]:
    """target_counts, remembered per reply in `cache` (a .npz; default: the state folder, keyed by
    the target file's name, size and date): counting the shipped replies takes minutes with a 1.5B
    target, and a second build (another K, another --bits, the user's text added) needs only what
    is new."""
    if cache is None:
        st = os.stat(target.facts.path)
        cache = state_dir() / "counts" / f"{Path(target.facts.path).stem}-{st.st_size}-{st.st_mtime_ns}.npz"
    keys = [hashlib.sha256(json.dumps(item).encode()).hexdigest()[:24] for item in items]
    known = dict(np.load(cache)) if cache.is_file() else {}
    missing = [i for i, key in enumerate(keys) if key + ".i" not in known]
    fresh = target_counts(target, [items[i] for i in missing], progress) if missing else []
    for i, counts in zip(missing, fresh):
        nz = np.flatnonzero(counts)  # sparse: the default sampler keeps few tokens per position
        known[keys[i] + ".i"], known[keys[i] + ".v"] = nz.astype(np.int32), counts[nz]
    if missing:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(cache.name + ".partial.npz")
        np.savez(partial, **known)
        os.replace(partial, cache)
    out = []
    for key in keys:
        counts = np.zeros(target.vocab_size, dtype=np.float32)
        counts[known[key + ".i"]] = known[key + ".v"]
        out.append(counts)
    return out


def target_counts(target, items: Sequence[tuple[str, str]], progress: Callable[[float], None] | None = None,
                  sp: SamplingParams = SamplingParams(), chunk: int = 64) -> list[np.ndarray]:
    """For each (prompt, reply): the target's sampling distribution summed over the reply's
    positions (teacher-forced: one batched pass per chunk), as [vocab] float32 counts."""
    out = []
    with renderer_for(target) as templates:  # one template renderer for every prompt
        for n, (prompt, reply) in enumerate(items):
            out.append(_reply_counts(target, prompt, reply, lambda m: chat_tokens(target, m, templates), sp, chunk,
                                     probs))
            if progress:
                progress((n + 1) / len(items))
    target.truncate(0)
    return out


def _reply_counts(target, prompt: str, reply: str, chat, sp: SamplingParams, chunk: int, probs) -> np.ndarray:
    """One (prompt, reply)'s summed distributions (target_counts)."""
    if prompt:
        head = chat([{"role": "user", "content": prompt}])
        body = target.tokenize(reply, add_special=False, parse_special=False)
    else:
        head, body = [], target.tokenize(reply, add_special=True, parse_special=False)
    tokens = (head + body)[:target.n_ctx - 1]
    start = max(len(head) - 1, 0)  # logits after the last prompt token predict the first reply token
    target.truncate(0)
    target.forward(tokens[:start], logits="none")
    counts = np.zeros(target.vocab_size, dtype=np.float64)
    for i in range(start, len(tokens), chunk):
        for row in target.forward(tokens[i:i + chunk], logits="all"):
            p = probs(row, sp)
            nz = np.flatnonzero(p)
            counts[nz] += p[nz]
    return counts.astype(np.float32)


def rank(counts: np.ndarray, vocab: Vocab) -> np.ndarray:
    """Token ids, most produced first; ties (most of the vocabulary: never seen) by SentencePiece
    score, else by lower id (BPE ids follow merge order, i.e. frequency in the tokenizer's corpus)."""
    second = -np.asarray(vocab.scores, dtype=np.float64) if vocab.scores is not None else np.arange(len(counts))
    return np.lexsort((np.arange(len(counts)), second, -counts))


def kept_ids(counts: np.ndarray, vocab: Vocab, k: int) -> np.ndarray:
    """The K tokens to keep, ascending: the forced ones, then the most produced."""
    forced = vocab.forced()
    if k < len(forced) + MIN_K // 4 or k < MIN_K:
        raise EdgespecError(f"--keep {k} is too small: at least {max(MIN_K, len(forced) + MIN_K // 4)} "
                            f"(the bytes and special tokens alone are {len(forced)})")
    if k >= vocab.size:
        raise EdgespecError(f"--keep {k} is not smaller than the vocabulary ({vocab.size} tokens): nothing to trim")
    is_forced = np.zeros(vocab.size, dtype=bool)
    is_forced[forced] = True
    order = rank(counts, vocab)
    rest = order[~is_forced[order]][: k - len(forced)]
    return np.sort(np.concatenate([forced, rest]))


def coverage(rank_counts: np.ndarray, held_out: Sequence[np.ndarray], vocab: Vocab, ks: Sequence[int]) -> dict:
    """For each K: the share of the held-out target probability mass inside the kept set (an
    upper bound on acceptance after trimming, relative to before)."""
    mass = np.sum(held_out, axis=0)
    total = float(mass.sum()) or 1.0
    return {k: float(mass[kept_ids(rank_counts, vocab, k)].sum()) / total for k in ks}


# --- writing the trimmed GGUF ------------------------------------------------------------------

def write_trimmed(source: str | os.PathLike, out: str | os.PathLike, kept: np.ndarray, metadata: dict,
                  progress: Callable[[float], None] | None = None) -> None:
    """Copy `source` to `out` with only the `kept` vocabulary rows (see the module docstring)."""
    header = validate(source)
    tokens = array_values(header, "tokenizer.ggml.tokens")
    vocab_size = len(tokens)
    remap = np.full(vocab_size, -1, dtype=np.int64)
    remap[kept] = np.arange(len(kept))
    arch = header.metadata["general.architecture"]
    kept_set = {tokens[i] for i in kept}

    def edit_key(name: str, value):
        if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            return [value[i] for i in kept]
        if name == "tokenizer.ggml.merges":
            return [m for m in value if _merge_inside(m, kept_set)]
        if name.startswith("tokenizer.ggml.") and name.endswith("_token_id"):
            if not 0 <= value < vocab_size or remap[value] < 0:
                return DROP  # an id pointing outside the kept set (forced ones never do)
            return int(remap[value])
        return len(kept) if name == f"{arch}.vocab_size" else value

    def edit_tensor(t, rows: np.ndarray):
        if t.name in VOCAB_TENSORS:
            if len(rows) != vocab_size:
                raise EdgespecError(f"{source}: {t.name} has {len(rows)} rows, not one per token ({vocab_size})")
            return t.name, rows[kept]
        if len(t.shape) == 2 and len(rows) == vocab_size:
            raise EdgespecError(f"{source}: tensor {t.name} has one row per token; trimming supports only "
                                f"{' and '.join(VOCAB_TENSORS)}")
        return t.name, rows

    rewrite(header, out, metadata, edit_key=edit_key, edit_tensor=edit_tensor, progress=progress)


def _merge_inside(merge: str, kept: set) -> bool:
    a, _, b = merge.partition(" ")
    return a in kept and b in kept and a + b in kept


# --- building ------------------------------------------------------------------------------------

def check_same_vocab(source: Vocab, target: Vocab, source_name: str, target_name: str) -> None:
    """Counting with the target only makes sense if its token ids mean the drafter's strings."""
    n = min(source.size, target.size)
    if abs(source.size - target.size) > 128 or source.tokens[:n] != target.tokens[:n]:
        raise EdgespecError(f"{target_name} and {source_name} have different vocabularies: "
                            "count tokens with a target from the drafter's model family (--target)")


def choose_k(counts: Sequence[np.ndarray], vocab: Vocab, source, target,
             layer_scale: float = 1.0, *, acceptance: float | None = None,
             memory_budget: int | None = None) -> tuple[int, list[str]]:
    """K with the best predicted tokens/s: acceptance scaled by the held-out coverage of each K
    (half the replies rank, the other half measure), drafter cost from the cost model at that
    head size (and blocks scaled by `layer_scale` when they are requantized). `acceptance`: the
    untrimmed drafter's (None: history, else the prior for a model); `memory_budget`: plan within
    it (a paged target weighs acceptance over a step's bytes, and takes more rows). Returns K and
    one line per candidate."""
    ranking, held_out = np.sum(counts[0::2], axis=0), counts[1::2]
    ks = [k for k in CANDIDATE_K if len(vocab.forced()) + MIN_K // 4 <= k < vocab.size]
    cov = coverage(ranking, held_out, vocab, ks)
    cov[vocab.size] = 1.0
    shape, tshape, prof = model_shape(source), model_shape(target), machine_profile(None)
    head_scale = min(1.0, BITS["q8_0"] / source_bits(shape)) if layer_scale < 1.0 else 1.0  # requantized: head at q8_0
    if memory_budget is not None:
        prof = prof.model_copy(update={"ram_available_bytes": memory_budget})
    base = acceptance or History().knowledge(target, source).acceptance or PRIOR_ACCEPTANCE["model"]
    speed = {}
    for k, c in cov.items():
        hyp = trimmed_shape(shape, k, layer_scale, head_scale)
        try:
            plan = planner.plan(tshape, prof, hyp, knowledge=planner.Knowledge(base * c, "coverage"), gpu=False)
        except EdgespecError:  # nothing fits in the budget with this head
            speed[k] = 0.0
            continue
        speed[k] = max((a.tokens_per_second for a in plan.alternatives if a.strategy == "draft"), default=0.0)
    if memory_budget is not None and not any(speed.values()):
        raise EdgespecError(f"no trimmed copy of {Path(source).name} drafts next to {Path(target).name} within "
                            f"{memory_budget / 2**30:.2f} GiB: give a bigger --mem-budget, fewer --bits, or --keep")
    best = max(ks, key=lambda k: (speed[k], -k))
    lines = [f"K={k}: held-out coverage {cov[k]:.3f}, {speed[k]:.1f} tok/s predicted"
             + (" (untrimmed)" if k == vocab.size else " (chosen)" if k == best else "") for k in cov]
    return best, lines


def build_trimmed(source, out, keep: int | None, target, calibration, metadata: dict,
                  report: Callable[[str, float], None], bits: str | None = None, *,
                  acceptance: float | None = None, memory_budget: int | None = None) -> None:
    """Count with `target`, choose K (or take `keep`; `acceptance` and `memory_budget` as
    choose_k), write the trimmed copy of `source` to `out`; with `bits`, requantize it (trim +
    QuantSpec): the blocks to `bits`, the K-row head kept at 8 bits (it is small once trimmed,
    and the drafter's ranking of tokens lives there)."""
    vocab = read_vocab(source)
    target = target or source
    if os.path.realpath(target) != os.path.realpath(source):
        check_same_vocab(vocab, read_vocab(target), Path(source).name, Path(target).name)
    vocab.byte_tokens()  # a tokenizer that cannot spell bytes fails here, before the long part
    if keep is not None:
        kept_ids(np.zeros(vocab.size), vocab, keep)  # K too small / too large: fail before counting
    items = calibration_texts(calibration)
    report("reading the target's distributions", 0.0)
    with LlamaCppBackend(target, LlamaOptions(n_ctx=2048)) as t:
        counts = cached_counts(t, items, lambda f: report("reading the target's distributions", f))
    counts = [np.pad(c, (0, max(vocab.size - len(c), 0)))[: vocab.size] for c in counts]
    if keep is None:
        report("choosing K", 0.0)
        keep, lines = choose_k(counts, vocab, source, target, BITS[bits] / source_bits(source) if bits else 1.0,
                               acceptance=acceptance, memory_budget=memory_budget)
    else:
        lines = [f"K={keep}: held-out coverage "
                 f"{coverage(np.sum(counts[0::2], axis=0), counts[1::2], vocab, [keep])[keep]:.3f} (given)"]
    kept = kept_ids(np.sum(counts, axis=0), vocab, keep)
    described = f"{len(items)} replies ({CALIBRATION.name}" + (f" + {Path(calibration).name})" if calibration else ")")
    metadata = metadata | {
        "edgespec.drafter.keep": int(keep),
        "edgespec.drafter.counted_with": Path(target).name[:120],
        "edgespec.drafter.calibration": described,
        "edgespec.drafter.k_choice": "; ".join(lines),
        KEPT_KEY: kept,
    }
    if bits:
        metadata[PREFIX + "quantization"] = f"{bits}, head q8_0"
    scratch = Path(out).with_name(Path(out).name + ".trim") if bits else Path(out)
    try:
        report(f"writing {keep} of {vocab.size} tokens", 0.0)
        write_trimmed(source, scratch, kept, metadata, lambda f: report(f"writing {keep} of {vocab.size} tokens", f))
        if bits:  # the quantizer copies every metadata key, kept ids included
            report(f"quantizing to {bits}", 0.0)
            quantize(scratch, out, bits, head="q8_0")
            report(f"quantizing to {bits}", 1.0)
    finally:
        if bits and scratch.is_file():
            scratch.unlink()
