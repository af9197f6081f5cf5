"""Targets bigger than memory: plain paging vs today's chains vs the paged plan, each run in its own
memory-limited cgroup with the model files evicted from the page cache first (bench/memlimit.py).

Configurations, all with the same target, drafter, prompt and sampling:
  plain    `--plain` as edgespec plans it: the memory limit read, part of the target pinned, the
           rest read from disk at every pass, no drafting (the baseline of every ratio)
  mmap     plain decoding as llama.cpp does it: the weights mapped, the kernel pages them (no plan)
  chains   the draft model's chains on that same mapping (no plan, no pinning)
  paged    what edgespec plans by itself in that cgroup: the plan's pinning and drafter
  overlap  paged, with the next tree grown during each target pass (overlap=True)

The budget is a fraction of the target's file size (the drafter counted inside it). Each run is a
separate process (a cgroup per run), so the ratio printed is of separate runs: keep the machine
otherwise idle while it runs.

    .venv/bin/python bench/paged.py -m F16.gguf -md DRAFT.gguf [--budgets 0.5,0.75] [--temps 0,0.8] [-n 32]
    .venv/bin/python bench/paged.py -m F16.gguf -md DRAFT.gguf --quick        # one prompt, T=0, 50%, 16 tokens
    .venv/bin/python bench/paged.py -m F16.gguf -md DRAFT.gguf --limit 2G --plain-on 3   # the broad set

Prompts: bench/prompts.py (default: its DEFAULT, the first prompt of every Spec-Bench category and
the chat prompt). Plain decoding reads the same weights for every token whatever the prompt and
the temperature, so --plain-on N measures it on the first N prompts at the first temperature only
and takes the mean as every prompt's baseline (saves an hour at 0.4 tok/s); the summary gives the
geometric mean of the ratios and the ratio of total tokens over total decode seconds, and at T=0
on how many prompts each configuration decoded plain's very text (lossless up to near-ties).

Needs root (cgroups). Prints tok/s per configuration and the ratio to plain, the share of the cores
kept busy over the reply (the rest idle, mostly waiting for the disk) and how many steps used a tree
grown ahead; --out FILE writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# "plain" is the baseline every ratio is set against: --plain, planned as edgespec plans it (the
# same paged placement and pinning its plain alternative has); "mmap" is plain decoding without a
# plan (llama.cpp's mmap, nothing pinned), a weaker baseline shown as an extra row
# "overlap": the paged plan with trees grown during the target's pass (core/drafters/pregrow.py;
# off by default)
CONFIGS = ("plain", "mmap", "chains", "paged", "overlap")


def child(config: str, target: str, draft: str, prompt: str, temp: float, n: int, tree_budget: int | None) -> dict:
    """One generation in this process (run inside the cgroup); returns what it measured."""
    from edge_spec.options import EngineOptions
    from edge_spec.pipeline.engine import Engine
    from edge_spec.types import SamplingParams

    unplanned = dict(plan=False, memory_budget=1 << 50, history=False)  # no plan, no pinning: the kernel pages
    options = {
        "plain": EngineOptions.of(model=target, plain=True, calibrate=False, history=False),
        "mmap": EngineOptions.of(model=target, plain=True, calibrate=False, **unplanned),
        "chains": EngineOptions.of(model=target, draft=draft, **unplanned),
        "paged": EngineOptions.of(model=target, draft=draft, history=False,
                                  **({"tree_budget": tree_budget} if tree_budget is not None else {})),
        "overlap": EngineOptions.of(model=target, draft=draft, history=False, overlap=True,
                                   **({"tree_budget": tree_budget} if tree_budget is not None else {})),
    }[config]
    t0 = time.perf_counter()
    with Engine.load(options) as engine:
        load = time.perf_counter() - t0
        tokens = engine.chat_tokens([{"role": "user", "content": prompt}])
        last, text = None, []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for step in engine.stream(tokens, SamplingParams(temperature=temp, max_tokens=n, seed=1)):
            last = step
            text.append(step.text)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        stats = last.stats
        paged = engine.target.capabilities.disk_bytes
        return {"config": config, "text": "".join(text), "tokens": stats.n_tokens, "decode_seconds": stats.decode_seconds,
                "grown_ahead": stats.grown_ahead, "steps": stats.n_steps,
                "tokens_per_second": stats.tokens_per_second, "tokens_per_pass": stats.mean_accepted_length,
                "load_seconds": load, "disk_bytes_per_pass": paged,
                # the share of the cores this process kept busy over the reply (prefill included):
                # what is left is CPU time idle, mostly waiting for the disk
                "cpu_busy": cpu / (wall * len(os.sched_getaffinity(0))),
                "plan": engine.plan.chosen.describe(engine.plan.target, engine.plan.drafter) if engine.plan else None}


def summarize(rows: list[dict], fraction: float, limit: int) -> None:
    """Per configuration and temperature: the geometric mean of the ratios to plain, and the
    ratio of all tokens over all decode seconds (slow prompts weigh more)."""
    print(f"budget {fraction:.2f} ({limit / 2**30:.2f} GiB), {len({r['prompt'] for r in rows})} prompts:")
    plain = [r for r in rows if r["config"] == "plain"]
    greedy = {r["prompt"]: r["text"] for r in plain if r["temperature"] == 0}
    for config in CONFIGS[1:]:  # lossless: greedy speculation decodes plain's text (up to near-ties)
        same = [r["text"] == greedy[r["prompt"]] for r in rows
                if r["config"] == config and r["temperature"] == 0 and r["prompt"] in greedy]
        if same:
            print(f"  {config:6s} T=0: the same text as plain on {sum(same)} of {len(same)} prompts")
    base = sum(r["tokens"] for r in plain) / sum(r["decode_seconds"] for r in plain) if plain else None
    for config in CONFIGS[1:]:
        for temp in sorted({r["temperature"] for r in rows}):
            mine = [r for r in rows if r["config"] == config and r["temperature"] == temp and r["ratio_to_plain"]]
            if not mine:
                continue
            geo = statistics.geometric_mean(r["ratio_to_plain"] for r in mine)
            total = sum(r["tokens"] for r in mine) / sum(r["decode_seconds"] for r in mine)
            per_pass = sum(r["tokens"] for r in mine) / sum(r["tokens"] / r["tokens_per_pass"] for r in mine)
            print(f"  {config:6s} T={temp:g}: geometric mean {geo:.2f}x plain (min {min(r['ratio_to_plain'] for r in mine):.2f}x), "
                  f"{total:.2f} tok/s over all{f' ({total / base:.2f}x)' if base else ''}, {per_pass:.2f} tok/pass",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="the target (bigger than the budgets)")
    ap.add_argument("-md", "--draft", required=True, help="the drafter")
    ap.add_argument("--budgets", default="0.5,0.75", help="memory limits as fractions of the target's file size")
    ap.add_argument("--temps", default="0,0.8")
    ap.add_argument("--prompts", default=None, help="ids and categories from bench/prompts.py (default: its DEFAULT)")
    ap.add_argument("--plain-on", type=int, default=0,
                    help="measure plain on the first N prompts (first temperature) only: their mean is the baseline")
    ap.add_argument("-n", "--max-tokens", type=int, default=32)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--quick", action="store_true", help="one prompt, T=0, budget 0.5, 16 tokens")
    ap.add_argument("--tree-budget", type=int, default=None, help="the paged run's tree budget (default: the plan's)")
    ap.add_argument("--limit", default=None, help="a memory limit (e.g. 2G) instead of --budgets' fractions")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from bench.prompts import DEFAULT, named

    if args.child:  # inside the cgroup
        config, name, temp = args.child.split(":")
        print(json.dumps(child(config, args.model, args.draft, dict(named(name))[name], float(temp), args.max_tokens,
                               args.tree_budget)))
        return
    from bench import memlimit

    if args.quick:
        args.budgets, args.temps, args.max_tokens = "0.5", "0", 16
        args.prompts = args.prompts or "chat"
    names = [name for name, _ in named(args.prompts or DEFAULT)]
    size = os.path.getsize(args.model)
    rows = []
    from edge_spec.options import parse_size

    limits = [parse_size(args.limit)] if args.limit else [int(size * float(b)) for b in args.budgets.split(",")]
    temps = args.temps.split(",")
    for limit in limits:
        fraction = limit / size
        plain_seen: list[float] = []
        for p, name in enumerate(names):
            for t, temp in enumerate(temps):
                found = {}
                for config in args.configs.split(","):
                    if config == "plain" and args.plain_on and (p >= args.plain_on or t > 0):
                        continue
                    cmd = [sys.executable, __file__, "-m", args.model, "-md", args.draft, "-n", str(args.max_tokens),
                           "--child", f"{config}:{name}:{temp}"]
                    if args.tree_budget is not None:
                        cmd += ["--tree-budget", str(args.tree_budget)]
                    done, peak = memlimit.run(cmd, limit, [args.model, args.draft], timeout=3600)
                    if done.returncode != 0:
                        print(f"{config} {name} T={temp} budget {fraction}: failed ({done.returncode}): "
                              f"{done.stderr.strip().splitlines()[-1:] }", file=sys.stderr)
                        continue
                    found[config] = json.loads(done.stdout.strip().splitlines()[-1]) | {"peak_bytes": peak}
                if "plain" in found:
                    plain_seen.append(found["plain"]["tokens_per_second"])
                base = (sum(plain_seen) / len(plain_seen) if args.plain_on and plain_seen
                        else found.get("plain", {}).get("tokens_per_second"))
                for config, r in found.items():
                    r |= {"budget": fraction, "limit_bytes": limit, "prompt": name, "temperature": float(temp),
                          "ratio_to_plain": r["tokens_per_second"] / base if base else None}
                    rows.append(r)
                    ratio = f"{r['ratio_to_plain']:.2f}x" if r["ratio_to_plain"] else "-"
                    print(f"budget {fraction:.2f} ({limit / 2**30:.2f} GiB)  {name:14s} T={temp:3s}  {config:6s}  "
                          f"{r['tokens_per_second']:6.2f} tok/s  {r['tokens_per_pass']:5.2f} tok/pass  {ratio}  "
                          f"CPU busy {r['cpu_busy']:.0%}  grown ahead {r['grown_ahead']}/{r['steps']}"
                          + (f"  [{r['plan']}]" if config == "paged" and r.get("plan") else ""), flush=True)
        if args.plain_on and plain_seen:  # every row against the final baseline
            base = sum(plain_seen) / len(plain_seen)
            for r in rows:
                if r["limit_bytes"] == limit:
                    r["ratio_to_plain"] = r["tokens_per_second"] / base
        summarize([r for r in rows if r["limit_bytes"] == limit], fraction, limit)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
