"""Plain decoding vs edgespec, side by side in one process, on the default pair.

The method (edge_spec.surfaces.benchmark, shared with `edgespec bench`): plain decoding and edgespec on
two contexts of the same loaded model, interleaved step by step, so that both see the same
machine at the same moments; each edgespec run starts from the controller state right after
calibration. This script adds what developers want: T > 0, repetitions, n-gram-only and tree
runs, every prompt's row. Prints decode tokens/s, acceptance, tokens per target pass and the
ratio to plain decoding; writes JSON with --out.

    .venv/bin/python bench/speculative.py [--reps 2] [-n 256] [--prompts fixed|chat,code,edit|coding,rag] [--out FILE]
    .venv/bin/python bench/speculative.py -m TARGET.gguf [-md DRAFT.gguf]   # another pair (planned as in chat)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.prompts import DEFAULT, named  # noqa: E402
from edge_spec.options import EngineOptions  # noqa: E402
from edge_spec.pipeline.engine import Engine  # noqa: E402
from edge_spec.surfaces.benchmark import Bench  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("-n", "--max-tokens", type=int, default=256)
    ap.add_argument("--prompts", default=DEFAULT, help="prompt ids and categories (bench/prompts.py)")
    ap.add_argument("--temps", default="0,0.8")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-m", "--model", default=None, help="target (default: the default pair)")
    ap.add_argument("-md", "--draft", default=None, help="draft model (default: what the plan picks)")
    ap.add_argument("--ngram", action="store_true", help="n-gram drafts only (no draft model)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    engine = Engine.load(EngineOptions.of(model=args.model, draft=args.draft, n_threads=args.threads, history=False,
                                          draft_model=not args.ngram))
    print(f"edgespec runs: {engine.plan.chosen.describe(engine.plan.target, engine.plan.drafter)}", file=sys.stderr)
    bench = Bench(engine)
    rows = []
    for name, text in named(args.prompts):
        for temp in (float(t) for t in args.temps.split(",")):
            row = bench.measure(name, text, temp, args.max_tokens, args.reps)
            rows.append(row)
            print(format_row(row), flush=True)
    bench.close()
    engine.close()
    print_table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "args": vars(args) | {"out": str(args.out)}}, indent=1))


def format_row(r: dict) -> str:
    return (f"{r['prompt']:<14} T={r['temperature']:<4} plain {r['plain_tps']:6.2f} tok/s  "
            f"edgespec {r['edgespec_tps']:6.2f} tok/s  ratio {r['ratio']:.2f}  "
            f"acceptance {r['acceptance']:.2f}  tokens/pass {r['tokens_per_pass']:.2f}")


def print_table(rows: list[dict]) -> None:
    print("\n| prompt | T | tokens compared | plain tok/s | edgespec tok/s | ratio | per rep | acceptance | tokens/pass |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt']} | {r['temperature']} | {', '.join(map(str, r['compared_tokens']))} | {r['plain_tps']} | "
              f"{r['edgespec_tps']} | **{r['ratio']}** | {', '.join(map(str, r['ratio_per_rep']))} | "
              f"{r['acceptance']} | {r['tokens_per_pass']} |")


if __name__ == "__main__":
    main()
