"""Is edgespec's default ever slower than --plain, counted from process start to the last token?
Whole processes of `edgespec generate [FLAGS]` against `edgespec generate [FLAGS] --plain`,
interleaved ABAB, --reps pairs per prompt and temperature (benchmark.end_to_end), on Spec-Bench
prompts of every category, held out from the ones the other benches use (each category's first
prompt is skipped). Prints a row per prompt as it goes, then per category and time-weighted over
all: median seconds of each, the ratio plain / edgespec and its range.

    .venv/bin/python bench/e2e.py [--per-category 3] [-n 128] [--temps 0,0.8] [--reps 3] [--out FILE] [-- FLAGS]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_spec.surfaces.benchmark import Settings, categories, e2e_by_category, end_to_end, load_prompts  # noqa: E402


def held_out(per_category: int) -> list:
    prompts = load_prompts()
    out = []
    for name in categories(prompts):
        out += [p for p in prompts if p.category == name][1:1 + per_category]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("-n", "--max-tokens", type=int, default=128)
    ap.add_argument("--temps", default="0,0.8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("flags", nargs="*", help="edgespec generate flags for both runs (after --)")
    args = ap.parse_args()
    prompts = held_out(args.per_category)
    settings = Settings(max_tokens=args.max_tokens, temperatures=tuple(float(t) for t in args.temps.split(",")))
    print(f"{len(prompts)} prompts, {len(categories(prompts))} categories, {args.reps} ABAB pairs each", flush=True)

    def done(r: dict) -> None:
        lo, hi = r["ratio_spread"]
        print(f"{r['category']:<15} {r['prompt']:<15} T={r['temperature']:<4} plain {r['plain_seconds']:6.2f} s  "
              f"edgespec {r['edgespec_seconds']:6.2f} s  {r['ratio']:.3f}x ({lo:.2f}-{hi:.2f})", flush=True)

    rows = end_to_end(args.flags, prompts, settings, args.reps, done)
    print("\n| category | T | prompts | plain s | edgespec s | ratio | range of prompts |")
    print("|---|---|---|---|---|---|---|")
    tables = {}
    for temp in settings.temperatures:
        tables[temp] = e2e_by_category([r for r in rows if r["temperature"] == temp])
        for c in tables[temp]:
            lo, hi = c["ratio_range"]
            print(f"| {c['category']} | {temp:g} | {c['prompts']} | {c['plain_seconds']:.1f} | {c['edgespec_seconds']:.1f} | "
                  f"**{c['ratio']:.3f}** | {lo:.2f}-{hi:.2f} |")
    total = e2e_by_category(rows)[-1]
    print(f"\ntime-weighted over all: {total['ratio']:.3f}x plain ({total['plain_seconds']:.0f} s against "
          f"{total['edgespec_seconds']:.0f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "tables": {str(t): v for t, v in tables.items()},
                                        "args": vars(args) | {"out": str(args.out)}}, indent=1))


if __name__ == "__main__":
    main()
