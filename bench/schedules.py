"""Issue 4's schedules side by side: plain decoding, the sequential schedule, the parallel one
(drafter in its own thread; on a CPU the cores split between drafter and target) and
multi-sequence drafts (token trees), on one pair, interleaved step by step in one process as
bench/speculative.py does (the parallel run's drafting thread is held while another run steps, so
it cannot take their cores). Prints tokens/s and each schedule's ratio to plain and to sequential.

    .venv/bin/python bench/schedules.py [-m TARGET.gguf] [-md DRAFT.gguf] [--draft-threads 1]
        [--schedules sequential,parallel] [--reps 1] [-n 128] [--prompts fixed|chat,code,edit|coding,rag] [--temps 0,0.8]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.prompts import DEFAULT, named  # noqa: E402
from edge_spec.core.runtime import Decoding, Runtime  # noqa: E402
from edge_spec.models import registry as models  # noqa: E402
from edge_spec.options import EngineOptions  # noqa: E402
from edge_spec.pipeline.engine import Engine  # noqa: E402
from edge_spec.surfaces.benchmark import interleaved, seconds_for  # noqa: E402
from edge_spec.types import SamplingParams  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="target (default: the default target)")
    ap.add_argument("-md", "--draft", default=models.DEFAULT_DRAFT, help="draft model (default: the default drafter)")
    ap.add_argument("--schedules", default="sequential,parallel")
    ap.add_argument("--draft-threads", type=int, default=1, help="parallel schedule: the drafter's threads (the target gets the rest)")
    ap.add_argument("--no-ngram", action="store_true", help="the draft model alone (no n-gram drafts first)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("-n", "--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", default=DEFAULT, help="prompt ids and categories (bench/prompts.py)")
    ap.add_argument("--temps", default="0,0.8")
    args = ap.parse_args()

    engine = Engine.load(EngineOptions.of(model=args.model, draft=args.draft, history=False))
    cores = engine.target.n_threads
    print(f"pair: {Path(engine.target.facts.path).name} + {Path(engine.draft_backend.facts.path).name}; "
          f"{cores} threads; parallel: drafter {args.draft_threads}, target {cores - args.draft_threads}", file=sys.stderr)
    contexts = []

    def sibling(backend, threads=None):
        ctx = backend.sibling()
        if threads:
            ctx.set_threads(threads)
        contexts.append(ctx)
        return ctx

    base = dataclasses.replace(engine.runtime.decoding, ngram=not args.no_ngram, tree_budget=0, interleaved=True)

    def runtime(schedule: str, target, draft_backend):
        """The engine's runtime on these contexts, with this schedule: its calibrated controller
        and decoding, drafting interleaved with the other runs."""
        plan = dataclasses.replace(base, schedule=schedule)
        return Runtime.from_plan(plan, target, draft_backend).fork(controller=engine.runtime.controller)

    seq_target, seq_draft = sibling(engine.target), sibling(engine.draft_backend)
    par_target = sibling(engine.target, cores - args.draft_threads)
    par_draft = sibling(engine.draft_backend, args.draft_threads)
    plain_target = sibling(engine.target)
    make = {
        "plain": lambda: Runtime.from_plan(Decoding(ngram=False), plain_target),
        "sequential": lambda: runtime("sequential", seq_target, seq_draft),
        "parallel": lambda: runtime("parallel", par_target, par_draft),
    }
    labels = ["plain", *args.schedules.split(",")]
    rows = []
    for name, text in named(args.prompts):
        prompt = engine.chat_tokens([{"role": "user", "content": text}])
        for temp in (float(t) for t in args.temps.split(",")):
            runs = {label: [] for label in labels}
            for rep in range(args.reps):
                sp = SamplingParams(temperature=temp, max_tokens=args.max_tokens, seed=2000 + rep)
                result = interleaved({label: make[label]() for label in labels}, prompt, sp)
                for label in labels:
                    runs[label].append(result[label])
            rows.append(summarize(name, temp, runs))
            print(format_row(rows[-1]), flush=True)
    for ctx in contexts:
        ctx.close()
    engine.close()
    print("\nratio to plain (and to sequential), pooled over the prompts:")
    for label in labels[1:]:
        to_plain = statistics.geometric_mean(r["ratio"][label] for r in rows)
        line = f"  {label:<11} {to_plain:.2f}x plain"
        if label != "sequential" and "sequential" in labels:
            to_seq = statistics.geometric_mean(r["ratio"][label] / r["ratio"]["sequential"] for r in rows)
            line += f"  ({to_seq:.2f}x sequential)"
        print(line)


def summarize(name: str, temp: float, runs: dict) -> dict:
    """Each schedule's rate over the tokens every run produced, as a ratio to plain."""
    common = [min(r[i]["tokens"] for r in runs.values()) for i in range(len(runs["plain"]))]
    seconds = {label: sum(seconds_for(r["trace"], n) for r, n in zip(rs, common)) for label, rs in runs.items()}
    out = {"prompt": name, "temperature": temp, "tokens": sum(common),
           "tps": {label: round(sum(common) / s, 2) for label, s in seconds.items()},
           "ratio": {label: seconds["plain"] / s for label, s in seconds.items()}, "detail": {}}
    for label, rs in runs.items():
        drafted = sum(r["drafted"] for r in rs)
        out["detail"][label] = (sum(r["accepted"] for r in rs) / drafted if drafted else 0.0,
                                statistics.mean(r["mean_accepted_length"] for r in rs),
                                sum(r.get("drafted_ahead", 0) for r in rs))
    return out


def format_row(r: dict) -> str:
    parts = [f"{r['prompt']:<5} T={r['temperature']:<4} plain {r['tps']['plain']:5.2f} tok/s"]
    for label in r["tps"]:
        if label == "plain":
            continue
        acc, per_pass, ahead = r["detail"][label]
        parts.append(f"{label} {r['ratio'][label]:.2f}x (acc {acc:.2f}, {per_pass:.2f} tok/pass"
                     + (f", {ahead} ahead)" if label == "parallel" else ")"))
    return "  ".join(parts)


if __name__ == "__main__":
    main()
