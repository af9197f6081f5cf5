"""Plain decoding vs edgespec, side by side in one process, on the default pair.

Same target weights, same threads, same prompts. The two generations run *interleaved*: plain
decoding on one llama.cpp context and edgespec on another context of the same loaded model,
advancing whichever has used less time so far, one step at a time. Both therefore see the same
machine at the same moments, and the drift of a shared 2-core machine (±10% between runs here)
cancels out of the ratio. Each edgespec run starts from the controller state right after
calibration (nothing learned from earlier prompts). Prints decode tokens/s, acceptance, tokens
per target pass and the ratio to plain decoding; writes JSON with --out.

    .venv/bin/python bench/speculative.py [--reps 2] [-n 256] [--prompts chat,code,edit] [--out FILE]
    .venv/bin/python bench/speculative.py -m TARGET.gguf [-md DRAFT.gguf]   # another pair (planned as in chat)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.prompts import PROMPTS  # noqa: E402
from edge_spec.engine import Engine  # noqa: E402
from edge_spec.options import EngineOptions  # noqa: E402
from edge_spec.runtime import Runtime  # noqa: E402
from edge_spec.types import SamplingParams  # noqa: E402


def interleaved(runtimes: dict[str, Runtime], prompt: list[int], sp: SamplingParams) -> dict[str, dict]:
    """Run generations step by step, next step to whichever has used the least time.

    Also records each one's decode time after every step, so that runs of different lengths
    (EOS at different places, as at T > 0) are compared over the same number of tokens: later
    tokens cost more (a longer context), and a short run would look faster per token.
    """
    gens = {label: rt.generate(prompt, sp) for label, rt in runtimes.items()}
    busy = dict.fromkeys(gens, 0.0)
    trace = {label: [] for label in gens}  # (tokens so far, decode seconds so far)
    last = {}
    while gens:
        label = min(gens, key=busy.get)
        t0 = time.perf_counter()
        step = next(gens[label], None)
        busy[label] += time.perf_counter() - t0
        if step is None or step.finish_reason:
            del gens[label]
        if step is not None:
            last[label] = step
            trace[label].append((step.stats.n_tokens, busy[label] - step.stats.prompt_seconds))
    out = {}
    for label, step in last.items():
        stats = step.stats.as_dict()
        # decode time = time inside this generator minus its prompt evaluation
        stats["decode_seconds"] = busy[label] - step.stats.prompt_seconds
        out[label] = stats | {"finish": step.finish_reason, "trace": trace[label]}
    return out


def seconds_for(trace: list, n: int) -> float:
    """Decode seconds spent to produce the first n tokens (prorated within the step that crossed n)."""
    prev_tokens, prev_seconds = 0, 0.0
    for tokens, seconds in trace:
        if tokens >= n:
            return prev_seconds + (seconds - prev_seconds) * (n - prev_tokens) / max(tokens - prev_tokens, 1)
        prev_tokens, prev_seconds = tokens, seconds
    return prev_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("-n", "--max-tokens", type=int, default=256)
    ap.add_argument("--prompts", default=",".join(PROMPTS))
    ap.add_argument("--temps", default="0,0.8")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-m", "--model", default=None, help="target (default: the default pair)")
    ap.add_argument("-md", "--draft", default=None, help="draft model (default: what the plan picks)")
    ap.add_argument("--ngram", action="store_true", help="n-gram drafts only (no draft model)")
    ap.add_argument("--tree-width", type=int, default=1, help="n-gram drafts as trees of this many branches")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    engine = Engine.load(EngineOptions(model=args.model, draft=args.draft, n_threads=args.threads, history=False,
                                       draft_model=not args.ngram, tree_width=args.tree_width))
    print(f"edgespec runs: {engine.plan.chosen.describe(engine.plan.target, engine.plan.drafter)}", file=sys.stderr)
    plain_context = engine.target.sibling()
    plain = Runtime(plain_context, [])
    calibrated = copy.deepcopy(engine.runtime.controller)
    rows = []
    for name in args.prompts.split(","):
        prompt = engine.chat_tokens([{"role": "user", "content": PROMPTS[name]}])
        for temp in (float(t) for t in args.temps.split(",")):
            runs = {"plain": [], "edgespec": []}
            for rep in range(args.reps):
                sp = SamplingParams(temperature=temp, max_tokens=args.max_tokens, seed=1000 + rep)
                spec = Runtime(engine.target, engine.runtime.drafters, copy.deepcopy(calibrated), args.tree_width)
                result = interleaved({"plain": plain, "edgespec": spec}, prompt, sp)
                for label, stats in result.items():
                    runs[label].append(stats)
            row = summarize(name, temp, runs)
            rows.append(row)
            print(format_row(row), flush=True)
    plain_context.close()
    engine.close()
    print_table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "args": vars(args) | {"out": str(args.out)}}, indent=1))


def summarize(name: str, temp: float, runs: dict) -> dict:
    """Rates over the tokens both runs of a pair produced, pooled over repetitions."""
    pairs = list(zip(runs["plain"], runs["edgespec"]))
    common = [min(p["tokens"], s["tokens"]) for p, s in pairs]
    plain_s = [seconds_for(p["trace"], n) for (p, _), n in zip(pairs, common)]
    spec_s = [seconds_for(s["trace"], n) for (_, s), n in zip(pairs, common)]
    spec = runs["edgespec"]
    drafted = sum(r["drafted"] for r in spec)
    for r in runs["plain"] + spec:
        del r["trace"]
    return {
        "prompt": name, "temperature": temp, "compared_tokens": common,
        "plain_tps": round(sum(common) / sum(plain_s), 2), "edgespec_tps": round(sum(common) / sum(spec_s), 2),
        "ratio": round(sum(plain_s) / sum(spec_s), 3),
        "ratio_per_rep": [round(p / s, 3) for p, s in zip(plain_s, spec_s)],
        "acceptance": round(sum(r["accepted"] for r in spec) / drafted, 3) if drafted else 0.0,
        "tokens_per_pass": round(statistics.mean(r["mean_accepted_length"] for r in spec), 3),
        "runs": runs,
    }


def format_row(r: dict) -> str:
    return (f"{r['prompt']:<6} T={r['temperature']:<4} plain {r['plain_tps']:6.2f} tok/s  "
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
