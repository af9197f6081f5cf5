"""The planner's predictions against measurements, on this machine, for every strategy it weighs.

Loads the default pair once, calibrates afresh (so the prediction is anchored to the machine's
speed right now, not to a cached calibration from a faster or slower hour), asks the planner for
its alternatives, then runs each strategy on the prompt set *interleaved* with the others, step by
step on separate llama.cpp contexts of the same weights, so that all see the same machine. The
"draft" strategy drafts exactly the planner's k at every step (as predicted), with n-gram drafts
first as in `edgespec chat`. Prints predicted vs measured decode tokens/s, the error, and each
strategy's measured ratio to plain decoding; writes JSON with --out.

    .venv/bin/python bench/plan.py [--reps 1] [-n 192] [--prompts fixed|chat,code,edit|coding,rag] [--temps 0] [--no-history]
    .venv/bin/python bench/plan.py -m TARGET.gguf -md DRAFT.gguf ...     # another pair
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.prompts import DEFAULT, named
from edge_spec.core.runtime import Decoding, Runtime
from edge_spec.models import registry as models
from edge_spec.models.shape import model_shape
from edge_spec.options import EngineOptions
from edge_spec.pipeline.engine import Engine
from edge_spec.plan import calibrate, planner
from edge_spec.plan.choose import machine_profile
from edge_spec.plan.history import History
from edge_spec.surfaces.benchmark import interleaved
from edge_spec.types import Costs, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("-n", "--max-tokens", type=int, default=192)
    ap.add_argument("--prompts", default=DEFAULT, help="prompt ids and categories (bench/prompts.py)")
    ap.add_argument("--temps", default="0")
    ap.add_argument("--profile", default=None, help="profile to plan with (default: this machine's)")
    ap.add_argument("--no-history", action="store_true", help="plan from priors, not past sessions")
    ap.add_argument("--calibration-reps", type=int, default=4, help="rounds over all pass sizes (minimum kept)")
    ap.add_argument("-m", "--model", default=None, help="target (default: the default target)")
    ap.add_argument("-md", "--draft", default=models.DEFAULT_DRAFT, help="draft model (default: the default drafter)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    engine = Engine.load(EngineOptions.of(model=args.model, draft=args.draft, plan=False, calibrate=False, history=False))
    target, drafter = engine.target, engine.draft_backend
    print("calibrating (fresh) ...", file=sys.stderr, flush=True)
    t_costs = calibrate.verify_costs(target, planner.MAX_DRAFT + 1, reps=args.calibration_reps, use_cache=False)
    d_costs = calibrate.verify_costs(drafter, 1, reps=args.calibration_reps, use_cache=False)
    knowledge = planner.Knowledge() if args.no_history else History().knowledge(target.facts.path, drafter.facts.path)
    plan = planner.plan(
        model_shape(target.facts.path), machine_profile(args.profile), model_shape(drafter.facts.path),
        knowledge=knowledge, calibrations=(
            calibrate.as_calibration(target.facts.path, t_costs, target.n_threads, 0),
            calibrate.as_calibration(drafter.facts.path, d_costs, drafter.n_threads, 0)),
        gpu=False, threads=target.n_threads)
    for line in plan.reasons():
        print(line, file=sys.stderr)

    costs = Costs(t_costs, d_costs[1])

    def runtime(context, ngram: bool, draft_backend=None, draft_length: int | None = None) -> Runtime:
        """What the plan's alternative runs: its drafters, the plan's budget, the fresh costs."""
        decoding = Decoding(ngram=ngram, max_draft=max(plan.max_draft, draft_length or 0), draft_length=draft_length)
        return Runtime.from_plan(decoding, context, draft_backend, costs)

    alternatives = {a.strategy: a for a in plan.alternatives if a.target.gpu < 0 and (a.drafter is None or a.drafter.gpu < 0)}
    contexts = {"plain": target.sibling(), "ngram": target.sibling(), "draft": target}
    measured = {s: {"tokens": 0, "seconds": 0.0, "drafted": 0, "accepted": 0} for s in alternatives}
    for name, text in named(args.prompts):
        prompt = engine.chat_tokens([{"role": "user", "content": text}])
        for temp in (float(t) for t in args.temps.split(",")):
            for rep in range(args.reps):
                runtimes = {
                    "plain": runtime(contexts["plain"], ngram=False),
                    "ngram": runtime(contexts["ngram"], ngram=True),
                    "draft": runtime(contexts["draft"], True, drafter, alternatives["draft"].draft_length),
                }
                sp = SamplingParams(temperature=temp, max_tokens=args.max_tokens, seed=2000 + rep)
                result = interleaved({s: runtimes[s] for s in alternatives}, prompt, sp)
                line = []
                for s, r in result.items():
                    m = measured[s]
                    m["tokens"] += r["tokens"]
                    m["seconds"] += r["decode_seconds"]
                    m["drafted"] += r["drafted"]
                    m["accepted"] += r["accepted"]
                    line.append(f"{s} {r['tokens'] / r['decode_seconds']:.1f}")
                print(f"{name:<5} T={temp} rep {rep}: " + ", ".join(line) + " tok/s", file=sys.stderr, flush=True)
    for s in ("plain", "ngram"):
        contexts[s].close()
    engine.close()

    base = measured["plain"]["tokens"] / measured["plain"]["seconds"]
    rows = []
    for s, a in alternatives.items():
        m = measured[s]
        tps = m["tokens"] / m["seconds"]
        rows.append({
            "strategy": s, "description": a.describe(plan.target, plan.drafter), "chosen": a == plan.chosen,
            "predicted_tps": round(a.tokens_per_second, 2), "measured_tps": round(tps, 2),
            "error": round(a.tokens_per_second / tps - 1, 3), "measured_vs_plain": round(tps / base, 3),
            "predicted_vs_plain": round(a.tokens_per_second / plan.plain.tokens_per_second, 3),
            "acceptance_predicted": a.acceptance,
            "acceptance_measured": round(m["accepted"] / m["drafted"], 3) if m["drafted"] else None,
            "tokens": m["tokens"],
        })
    print("\n| strategy | chosen | predicted tok/s | measured tok/s | error | predicted ×plain | measured ×plain |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['description']} | {'**yes**' if r['chosen'] else ''} | {r['predicted_tps']} | {r['measured_tps']} | "
              f"{r['error']:+.0%} | {r['predicted_vs_plain']} | {r['measured_vs_plain']} |")
    best = max(rows, key=lambda r: r["measured_tps"])
    chosen = next(r for r in rows if r["chosen"])
    print(f"\nchosen {chosen['strategy']} measured {chosen['measured_tps']} tok/s; fastest measured "
          f"{best['strategy']} {best['measured_tps']} tok/s (chosen/fastest = {chosen['measured_tps'] / best['measured_tps']:.3f})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "reasons": plan.reasons(),
                                        "args": vars(args) | {"out": str(args.out) if args.out else None}}, indent=1))


if __name__ == "__main__":
    main()
