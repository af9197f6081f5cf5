"""Targets bigger than memory: plain paging vs today's chains vs the paged plan, each run in its own
memory-limited cgroup with the model files evicted from the page cache first (bench/memlimit.py).

Configurations, all with the same target, prompt and sampling:
  plain    `--plain` as edgespec plans it: the memory limit read, part of the target pinned, the
           rest read from disk at every pass, no drafting (the baseline of every ratio)
  mmap     plain decoding as llama.cpp does it: the weights mapped, the kernel pages them (no plan)
  chains   the draft model's (-md) chains on that same mapping (no plan, no pinning)
  self     chains of the self-drafter (--self-drafter, a low-bit copy of the target) likewise
  paged    what edgespec plans in that cgroup with the -md drafter: the plan's pinning and trees
  auto     the default plan: edgespec picks the drafter too (the drafter search weighs -md, the
           built self-drafters and none against the memory they take from the pinned target)
  auto-faults  auto without reading ahead between passes (read_ahead=False): the pass's own
           page faults read every streamed byte, the disk idle while the CPU drafts
  auto-lru auto without drop-behind (drop_behind=False): the streamed weights left to the page
           cache's LRU, which evicts them by direct reclaim during the pass
  overlap  paged, with the next tree grown during each target pass (overlap=True)
  llama    llama.cpp's own `llama-speculative-simple` (--llama-spec BINARY) with the -md drafter,
           --spec-draft-n-max 16, the same chat-templated prompt: the peer's anchor row

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

Each run reports decode tok/s and end-to-end seconds (the process's start to its last token:
loading, pinning, prefill and calibration included). --reps N repeats the whole interleaved
round (prompt by prompt, every configuration in turn) N times; the summary gives medians and the
range. A run the cgroup kills for memory is a row that says so.

Needs root (cgroups). Prints tok/s per configuration and the ratio to plain, the share of the cores
kept busy over the reply (the rest idle, mostly waiting for the disk), how many steps used a tree
grown ahead, and the plan's own prediction next to what it measured; --out FILE writes JSON.
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
CONFIGS = ("plain", "mmap", "chains", "self", "paged", "auto", "auto-faults", "auto-lru", "overlap", "llama")


def child(config: str, target: str, draft: str, prompt: str, temp: float, n: int, tree_budget: int | None,
          self_drafter: str | None = None) -> dict:
    """One generation in this process (run inside the cgroup); returns what it measured."""
    import psutil

    from edge_spec.options import EngineOptions
    from edge_spec.pipeline.engine import Engine
    from edge_spec.types import SamplingParams

    started = psutil.Process().create_time()
    unplanned = dict(plan=False, memory_budget=1 << 50, history=False)  # no plan, no pinning: the kernel pages
    trees = {"tree_budget": tree_budget} if tree_budget is not None else {}
    options = {
        "plain": lambda: EngineOptions.of(model=target, plain=True, calibrate=False, history=False),
        "mmap": lambda: EngineOptions.of(model=target, plain=True, calibrate=False, **unplanned),
        "chains": lambda: EngineOptions.of(model=target, draft=draft, **unplanned),
        "self": lambda: EngineOptions.of(model=target, draft=self_drafter, **unplanned),
        "paged": lambda: EngineOptions.of(model=target, draft=draft, history=False, **trees),
        "auto": lambda: EngineOptions.of(model=target, history=False, **trees),
        # the default plan without reading ahead between passes: only the pass's faults read
        "auto-faults": lambda: EngineOptions.of(model=target, history=False, read_ahead=False, **trees),
        # the default plan with the streamed weights left to the page cache's LRU (no drop-behind)
        "auto-lru": lambda: EngineOptions.of(model=target, history=False, drop_behind=False, **trees),
        "overlap": lambda: EngineOptions.of(model=target, draft=draft, history=False, overlap=True, **trees),
    }[config]()
    t0 = time.perf_counter()
    with Engine.load(options) as engine:
        load = time.perf_counter() - t0
        tokens = engine.chat_tokens([{"role": "user", "content": prompt}])
        last, text = None, []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for step in engine.stream(tokens, SamplingParams(temperature=temp, max_tokens=n, seed=1)):
            last = step
            text.append(step.text)
        end_to_end = time.time() - started
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        stats = last.stats
        paged = engine.target.capabilities.disk_bytes
        pager = getattr(engine.target, "pager", None)
        plan = engine.plan
        return {"config": config, "text": "".join(text), "tokens": stats.n_tokens, "decode_seconds": stats.decode_seconds,
                "grown_ahead": stats.grown_ahead, "steps": stats.n_steps,
                "tokens_per_second": stats.tokens_per_second, "tokens_per_pass": stats.mean_accepted_length,
                "load_seconds": load, "end_to_end_seconds": end_to_end, "disk_bytes_per_pass": paged,
                "read_ahead_bytes": pager.stats.read_ahead_bytes if pager is not None else 0,
                # the share of the cores this process kept busy over the reply (prefill included):
                # what is left is CPU time idle, mostly waiting for the disk
                "cpu_busy": cpu / (wall * len(os.sched_getaffinity(0))),
                "predicted_tokens_per_second": plan.chosen.tokens_per_second if plan else None,
                "drafter": Path(plan.drafter.path).name if plan and plan.drafter else None,
                "plan": plan.chosen.describe(plan.target, plan.drafter) if plan else None}


def llama_spec(binary: str, target: str, draft: str, prompt: str, temp: float, n: int, limit: int) -> dict:
    """llama.cpp's own speculative decoding on the same chat-templated prompt, in a cgroup of its
    own with the files evicted; its decode rate parsed from its log, end to end timed here."""
    import re

    from bench import memlimit
    from edge_spec.models.chat_template import render
    from edge_spec.models.modelfile import ModelFile

    meta = ModelFile.find(target).header.metadata
    text = render(meta.get("tokenizer.chat_template"), [{"role": "user", "content": prompt}])
    cmd = [binary, "-m", target, "-md", draft, "-p", text, "-n", str(n), "--temp", str(temp), "--seed", "1",
           "-t", str(len(os.sched_getaffinity(0))), "-c", "4096", "--spec-type", "draft-simple",
           "--spec-draft-n-max", "16"]
    t0 = time.perf_counter()
    done, peak = memlimit.run(cmd, limit, [target, draft], timeout=3600)
    wall = time.perf_counter() - t0
    log = done.stdout + done.stderr
    decoded = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
    accept = re.search(r"n_accept\s*=\s*(\d+)", log)
    drafted = re.search(r"n_drafted\s*=\s*(\d+)", log)
    if done.returncode != 0 or not decoded:
        raise RuntimeError(f"exit {done.returncode}: {log.strip().splitlines()[-1:] }")
    tokens, seconds = int(decoded.group(1)), float(decoded.group(2))
    passes = tokens - int(accept.group(1)) if accept and drafted else tokens
    return {"config": "llama", "text": "", "tokens": tokens, "decode_seconds": seconds, "grown_ahead": 0,
            "steps": passes, "tokens_per_second": tokens / seconds, "tokens_per_pass": tokens / max(passes, 1),
            "load_seconds": None, "end_to_end_seconds": wall, "disk_bytes_per_pass": None, "cpu_busy": float("nan"),
            "predicted_tokens_per_second": None, "drafter": Path(draft).name, "plan": None, "peak_bytes": peak}


def summarize(rows: list[dict], fraction: float, limit: int) -> None:
    """Per configuration and temperature: medians and ranges over prompts and repeats of decode
    tok/s, end-to-end seconds and tokens per pass, the ratio of the medians to plain's, and the
    plan's prediction against what it measured; then the runs killed for memory."""
    print(f"budget {fraction:.2f} ({limit / 2**30:.2f} GiB), {len({r['prompt'] for r in rows})} prompts:")
    done = [r for r in rows if not r.get("failed")]
    plain = [r for r in done if r["config"] == "plain"]
    greedy = {r["prompt"]: r["text"] for r in plain if r["temperature"] == 0}
    for config in CONFIGS[1:]:  # lossless: greedy speculation decodes plain's text (up to near-ties)
        same = [r["text"] == greedy[r["prompt"]] for r in done
                if r["config"] == config and r["temperature"] == 0 and r["prompt"] in greedy and r["text"]]
        if same:
            print(f"  {config:7s} T=0: the same text as plain on {sum(same)} of {len(same)} runs")
    print(f"  {'config':7s} {'T':>4s} {'runs':>4s}  {'tok/s (range)':>20s} {'x plain':>7s}  "
          f"{'end to end s (range)':>22s} {'x plain':>7s}  {'tok/pass':>8s}  {'predicted':>9s}")
    for temp in sorted({r["temperature"] for r in done}):
        base = [r for r in plain if r["temperature"] == temp] or plain
        b_rate = statistics.median(r["tokens_per_second"] for r in base) if base else None
        b_e2e = statistics.median(r["end_to_end_seconds"] for r in base) if base else None
        for config in CONFIGS:
            mine = [r for r in done if r["config"] == config and r["temperature"] == temp]
            if not mine:
                continue
            rate = [r["tokens_per_second"] for r in mine]
            e2e = [r["end_to_end_seconds"] for r in mine]
            per_pass = sum(r["tokens"] for r in mine) / sum(r["tokens"] / r["tokens_per_pass"] for r in mine)
            pred = [r["predicted_tokens_per_second"] for r in mine if r.get("predicted_tokens_per_second")]
            print(f"  {config:7s} {temp:4g} {len(mine):4d}  "
                  f"{statistics.median(rate):6.2f} ({min(rate):5.2f}-{max(rate):5.2f}) "
                  f"{statistics.median(rate) / b_rate if b_rate else float('nan'):6.2f}x  "
                  f"{statistics.median(e2e):7.1f} ({min(e2e):6.1f}-{max(e2e):6.1f}) "
                  f"{b_e2e / statistics.median(e2e) if b_e2e else float('nan'):6.2f}x  {per_pass:8.2f}  "
                  + (f"{statistics.median(pred):9.2f}" if pred else f"{'-':>9s}"), flush=True)
    for prompt in sorted({r["prompt"] for r in done}):  # per prompt: medians over the repeats
        cells = []
        for config in CONFIGS:
            mine = [r for r in done if r["config"] == config and r["prompt"] == prompt]
            if mine:
                cells.append(f"{config} {statistics.median(r['tokens_per_second'] for r in mine):.2f} tok/s "
                             f"{statistics.median(r['end_to_end_seconds'] for r in mine):.1f} s")
        print(f"  {prompt}: " + ", ".join(cells))
    for r in rows:
        if r.get("failed"):
            print(f"  {r['config']:7s} {r['prompt']} T={r['temperature']:g}: {r['failed']}")


def run_one(args, config: str, name: str, prompt: str, temp: str, limit: int) -> dict:
    """One configuration on one prompt, in a cgroup of its own with the files evicted: its row,
    or a row that says why it failed (killed for memory: the cgroup's OOM killer, signal 9)."""
    from bench import memlimit

    if config == "llama":
        try:
            return llama_spec(args.llama_spec, args.model, args.draft, prompt, float(temp), args.max_tokens, limit)
        except RuntimeError as e:
            return {"config": config, "failed": str(e)}
    cmd = [sys.executable, __file__, "-m", args.model, "-md", args.draft, "-n", str(args.max_tokens),
           "--child", f"{config}:{name}:{temp}"]
    if args.tree_budget is not None:
        cmd += ["--tree-budget", str(args.tree_budget)]
    if args.self_drafter:
        cmd += ["--self-drafter", args.self_drafter]
    files = [args.model, args.draft] + ([args.self_drafter] if args.self_drafter else [])
    done, peak = memlimit.run(cmd, limit, files, timeout=3600)
    if done.returncode != 0:
        killed = done.returncode in (-9, 137)
        why = "killed for memory" if killed else f"failed ({done.returncode})"
        return {"config": config, "failed": f"{why}: {done.stderr.strip().splitlines()[-1:]}", "peak_bytes": peak}
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"peak_bytes": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True, help="the target (bigger than the budgets)")
    ap.add_argument("-md", "--draft", required=True, help="the drafter")
    ap.add_argument("--self-drafter", default=None, help="a self-drafter of the target (`edgespec drafter build`): "
                                                         "the `self` configuration")
    ap.add_argument("--llama-spec", default=None, help="llama.cpp's llama-speculative-simple: the `llama` configuration")
    ap.add_argument("--budgets", default="0.5,0.75", help="memory limits as fractions of the target's file size")
    ap.add_argument("--temps", default="0,0.8")
    ap.add_argument("--prompts", default=None, help="ids and categories from bench/prompts.py (default: its DEFAULT)")
    ap.add_argument("--plain-on", type=int, default=0,
                    help="measure plain on the first N prompts (first temperature) only: their median is the baseline")
    ap.add_argument("-n", "--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=1, help="rounds of every prompt and configuration, interleaved")
    ap.add_argument("--configs", default="plain,mmap,chains,paged,overlap")
    ap.add_argument("--quick", action="store_true", help="one prompt, T=0, budget 0.5, 16 tokens")
    ap.add_argument("--tree-budget", type=int, default=None, help="the paged run's tree budget (default: the plan's)")
    ap.add_argument("--limit", default=None, help="memory limits (e.g. 2G or 2G,2.5G) instead of --budgets' fractions")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from bench.prompts import DEFAULT, named

    if args.child:  # inside the cgroup
        config, name, temp = args.child.split(":")
        print(json.dumps(child(config, args.model, args.draft, dict(named(name))[name], float(temp), args.max_tokens,
                               args.tree_budget, args.self_drafter)))
        return
    if args.quick:
        args.budgets, args.temps, args.max_tokens = "0.5", "0", 16
        args.prompts = args.prompts or "chat"
    configs = args.configs.split(",")
    if unknown := set(configs) - set(CONFIGS):
        ap.error(f"unknown configurations {sorted(unknown)}: use {', '.join(CONFIGS)}")
    if "self" in configs and not args.self_drafter:
        ap.error("the `self` configuration needs --self-drafter")
    if "llama" in configs and not args.llama_spec:
        ap.error("the `llama` configuration needs --llama-spec (build llama-speculative-simple from the sdist's llama.cpp)")
    prompts = named(args.prompts or DEFAULT)
    size = os.path.getsize(args.model)
    rows = []
    from edge_spec.options import parse_size

    limits = ([parse_size(x) for x in args.limit.split(",")] if args.limit
              else [int(size * float(b)) for b in args.budgets.split(",")])
    temps = args.temps.split(",")
    for limit in limits:
        fraction = limit / size
        for rep in range(args.reps):
            for p, (name, prompt) in enumerate(prompts):
                for t, temp in enumerate(temps):
                    for config in configs:
                        if config == "plain" and args.plain_on and (p >= args.plain_on or t > 0):
                            continue
                        r = run_one(args, config, name, prompt, temp, limit)
                        r |= {"budget": fraction, "limit_bytes": limit, "prompt": name, "temperature": float(temp),
                              "rep": rep}
                        rows.append(r)
                        head = f"budget {fraction:.2f} ({limit / 2**30:.2f} GiB)  #{rep} {name:14s} T={temp:3s}  {config:7s}"
                        if r.get("failed"):
                            print(f"{head}  {r['failed']}", flush=True)
                            continue
                        predicted = r.get("predicted_tokens_per_second")
                        print(f"{head}  {r['tokens_per_second']:6.2f} tok/s  {r['end_to_end_seconds']:6.1f} s end to end  "
                              f"{r['tokens_per_pass']:5.2f} tok/pass  CPU busy {r['cpu_busy']:.0%}  "
                              f"grown ahead {r['grown_ahead']}/{r['steps']}"
                              + (f"  predicted {predicted:.2f}" if predicted else "")
                              + (f"  [{r['plan']}]" if config in ("paged", "auto", "auto-faults") and r.get("plan") else ""), flush=True)
        summarize([r for r in rows if r["limit_bytes"] == limit], fraction, limit)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
