"""VocabTrim: a drafter with a trimmed LM head vs the same drafter untrimmed, side by side.

1. Counts the target's next-token distributions over the shipped calibration replies once, and
   prints each K's held-out coverage (target probability mass inside the kept set).
2. Writes the trimmed drafter at each K (into --dir); with --bits, also each K requantized with
   llama.cpp's quantizer (trim + quant, LM head at --head), and the untrimmed drafter requantized
   the same way, so the two effects can be told apart.
3. Draft step cost: one decode step + the argmax over its logits, as ModelDrafter does it,
   interleaved round-robin over the untrimmed and trimmed drafters (same machine moments); the
   median and its ratio to the untrimmed drafter.
4. End to end on the bench prompts (bench/prompts.py, distinct from the calibration prompts):
   plain decoding and speculative decoding with each drafter, interleaved step by step as in
   bench/speculative.py; tokens/s, ratio to plain, ratio to the untrimmed drafter, acceptance.

    .venv/bin/python bench/trim.py                                   # default pair: 0.5B drafter, 1.5B target
    .venv/bin/python bench/trim.py --ks 32768 --bits q4_0            # + the trimmed drafter requantized
    .venv/bin/python bench/trim.py --source gemma-3-270m-q4_k_m --target gemma-3-270m-q4_k_m --ks 8192,16384,32768
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.prompts import DEFAULT, PROMPTS, named  # noqa: E402
from edge_spec.backends.llama_cpp import HEAD_TYPES, LlamaCppBackend, LlamaOptions, quantize  # noqa: E402
from edge_spec.backends.trimmed import as_drafter_of  # noqa: E402
from edge_spec.build.trim import calibration_texts, coverage, kept_ids, read_vocab, target_counts, write_trimmed
from edge_spec.core.runtime import Decoding, Runtime  # noqa: E402
from edge_spec.models import registry as models  # noqa: E402
from edge_spec.models.chat_template import chat_tokens  # noqa: E402
from edge_spec.pipeline.resolve import resolve_model  # noqa: E402
from edge_spec.surfaces.benchmark import interleaved, seconds_for  # noqa: E402
from edge_spec.types import SamplingParams  # noqa: E402


def step_costs(drafters: dict, prompt: list[int], steps: int) -> dict[str, float]:
    """Median seconds of one greedy draft step per drafter, round-robin."""
    times = {label: [] for label in drafters}
    for d in drafters.values():
        d.truncate(0)
        last = d.forward(prompt, logits="last")[-1]
    feed = {label: int(prompt[-1]) for label in drafters}
    for _ in range(steps):
        for label, d in drafters.items():
            t0 = time.perf_counter()
            row = d.forward([feed[label]], logits="last")[-1]
            x = int(np.argmax(row))
            times[label].append(time.perf_counter() - t0)
            feed[label] = int(d.kept[x]) if hasattr(d, "kept") else x
    del last
    return {label: statistics.median(t) for label, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=models.DEFAULT_DRAFT, help="the drafter to trim")
    ap.add_argument("--target", default=models.DEFAULT_TARGET, help="the target (counts, verification)")
    ap.add_argument("--ks", default="8192,16384,32768")
    ap.add_argument("--steps", type=int, default=48, help="draft steps timed per drafter")
    ap.add_argument("-n", "--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", default=DEFAULT, help="prompt ids and categories (bench/prompts.py)")
    ap.add_argument("--temps", default="0")
    ap.add_argument("-k", "--draft-length", type=int, default=3,
                    help="tokens drafted per step end to end (fixed, so the drafters' costs show; 0 = adaptive)")
    ap.add_argument("--bits", default=None, help="also measure each drafter requantized to this type (e.g. q4_0)")
    ap.add_argument("--head", default="q8_0", choices=sorted(HEAD_TYPES),
                    help="LM head type of the requantized drafters (q8_0: as `drafter build --method trim --bits`)")
    ap.add_argument("--no-e2e", action="store_true", help="coverage and step cost only")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/edgespec-trim"))
    args = ap.parse_args()
    source, target_path = resolve_model(args.source, models.DEFAULT_DRAFT), resolve_model(args.target, models.DEFAULT_TARGET)
    ks = [int(k) for k in args.ks.split(",")]
    vocab = read_vocab(source)
    opts = LlamaOptions(n_ctx=2048)

    target = LlamaCppBackend(target_path, opts)
    args.dir.mkdir(parents=True, exist_ok=True)
    texts = calibration_texts()
    tag = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:12]
    cache = args.dir / f"counts-{target_path.stem}-{tag}.npy"  # counting takes minutes; keyed by target and texts
    if cache.is_file():
        counts = list(np.load(cache))
    else:
        t0 = time.perf_counter()
        counts = target_counts(target, texts)
        print(f"counted {len(counts)} calibration replies with {target_path.name} in {time.perf_counter() - t0:.0f} s")
        np.save(cache, np.stack(counts))
    counts = [np.pad(c, (0, max(vocab.size - len(c), 0)))[: vocab.size] for c in counts]
    cov = coverage(np.sum(counts[0::2], axis=0), counts[1::2], vocab, ks)
    paths, rows = {"untrimmed": source}, {"untrimmed": vocab.size}
    for k in ks:
        paths[f"K={k}"], rows[f"K={k}"] = args.dir / f"{source.stem}.trim-{k}.gguf", k
        kept = kept_ids(np.sum(counts, axis=0), vocab, k)
        write_trimmed(source, paths[f"K={k}"], kept, {"edgespec.drafter.kept_ids": kept})
    if args.bits:
        head = args.head
        for label in list(paths):
            quant = f"{label}+{args.bits}" + (f"/head {head}" if head != args.bits else "")
            paths[quant], rows[quant] = args.dir / f"{Path(paths[label]).stem}.{args.bits}-{head}.gguf", rows[label]
            if rows[label] < vocab.size or not paths[quant].is_file():  # trimmed files were just rewritten
                quantize(paths[label], paths[quant], args.bits, head=head)

    backends = {}
    for label, path in paths.items():
        backends[label] = LlamaCppBackend(path, opts)
        if rows[label] < vocab.size:
            backends[label] = as_drafter_of(target, path, backends[label])
    prompt = chat_tokens(target, [{"role": "user", "content": PROMPTS["code"]}])
    cost = step_costs(backends, prompt, args.steps)
    base = cost["untrimmed"]
    print(f"\ndrafter {source.name} ({vocab.size} tokens), counted with {target_path.name}")
    print("| drafter | head rows | held-out coverage | draft step ms | step cost vs untrimmed |")
    print("|---|---|---|---|---|")
    for label, c in cost.items():
        k = rows[label]
        print(f"| {label} | {k} | {cov.get(k, 1.0):.3f} | {c * 1e3:.1f} | **{c / base:.2f}** |")
    if args.no_e2e:
        return

    print("\n| prompt | T | drafter | tok/s | vs plain | vs untrimmed | acceptance | tokens/pass |")
    print("|---|---|---|---|---|---|---|---|")
    contexts = {label: target.sibling() for label in ["plain", *backends]}
    for name, text in named(args.prompts):
        prompt = chat_tokens(target, [{"role": "user", "content": text}])
        for temp in (float(t) for t in args.temps.split(",")):
            sp = SamplingParams(temperature=temp, max_tokens=args.max_tokens, seed=7)
            runtimes = {"plain": Runtime.from_plan(Decoding(ngram=False), contexts["plain"])}
            for label, d in backends.items():
                d.truncate(0)
                runtimes[label] = Runtime.from_plan(Decoding(ngram=False, draft_length=args.draft_length or None),
                                                    contexts[label], d)
            result = interleaved(runtimes, prompt, sp)
            n = min(r["tokens"] for r in result.values())
            secs = {label: seconds_for(r["trace"], n) for label, r in result.items()}
            for label, r in result.items():
                if label == "plain":
                    continue
                acc = r["accepted"] / r["drafted"] if r["drafted"] else 0.0
                print(f"| {name} | {temp} | {label} | {n / secs[label]:.2f} | **{secs['plain'] / secs[label]:.2f}** | "
                      f"{secs['untrimmed'] / secs[label]:.2f} | {acc:.3f} | {r['mean_accepted_length']:.2f} |", flush=True)
    for c in contexts.values():
        c.close()


if __name__ == "__main__":
    main()
