"""Plain decoding vs edgespec with the target split between this process and rpc-server workers
on 127.0.0.1, each worker reached through a LatencyProxy (bench/latency_proxy.py) that adds 0, 1
or 5 ms to every round trip: does speculation hide the network?

A target split over RPC pays the network on every target pass; a speculative step verifies its
whole draft in one pass, so it pays the network once for several tokens, and edgespec's ratio to
plain decoding should grow with the latency. Per latency: fresh workers and proxies, the plain
engine and edgespec's loaded (each on workers of its own: an rpc-server serves one client at a
time), then the two interleaved step by step as in edge_spec.surfaces.benchmark (both see the same machine
at the same moments; each edgespec run starts from the controller state right after calibration),
then everything torn down. Prints per latency and temperature the tok/s of both, the ratio, and
that ratio over the ratio at the lowest latency (0 ms): above 1 is speculation hiding the network.

    .venv/bin/python bench/rpc.py [--workers 1|2] [--latency 0,1,5] [--ngl N|plan] [-n 128] [--temps 0,0.8]
                                  [--per-category 1] [--categories coding,qa] [--quick] [--json]
    .venv/bin/python bench/rpc.py -m TARGET.gguf -md DRAFT.gguf     # another pair (default: the default pair)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.latency_proxy import LatencyProxy  # noqa: E402
from edge_spec.surfaces import benchmark  # noqa: E402
from edge_spec.surfaces.benchmark import QUICK, Settings  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    from edge_spec.types import EdgespecError

    args = parse_args(argv)
    try:
        prompts = benchmark.select(benchmark.load_prompts(), args.settings)
        layers = target_layers(args.model)
    except EdgespecError as e:
        sys.exit(f"rpc.py: error: {e}")
    ngl = layers // 2 if args.ngl == "half" else args.ngl
    rows, strategies = [], {}
    for delay in args.latency:
        found, strategies[delay] = run_latency(args, delay, ngl, prompts)
        rows += found
    table = pool(rows, args.latency)
    command = reproduce(argv if argv is not None else sys.argv[1:])
    if args.json:
        print(json.dumps({"command": command, "target_layers": layers, "ngl": ngl, "workers": args.workers,
                          "strategies": strategies, "table": table,
                          "rows": [{k: v for k, v in r.items() if k != "runs"} for r in rows]}, indent=1))
        return
    split = f"{ngl} of {layers} layers" if ngl is not None else f"the plan's share of {layers} layers"
    print(f"\n{split} on {args.workers} rpc-server worker(s) per engine, {len(prompts)} prompts, "
          f"{args.settings.max_tokens} tokens each")
    for delay, strategy in strategies.items():
        print(f"edgespec at +{delay:g} ms: {strategy}")
    print(format_table(table))
    print()
    for line in conclusions(table):
        print(line)
    print(f"\nreproduce: {command}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="target (default: the default pair's)")
    ap.add_argument("-md", "--draft", default=None, help="draft model (default: the default pair's, or the plan's)")
    ap.add_argument("--workers", type=int, choices=(1, 2), default=1, help="rpc-server workers per engine")
    ap.add_argument("--latency", type=_numbers, default=(0.0, 1.0, 5.0),
                    help="added milliseconds per round trip, comma-separated (default 0,1,5)")
    ap.add_argument("--ngl", type=_ngl, default="half",
                    help="target layers on the workers (default: half of them; 'plan': the plan's choice)")
    ap.add_argument("-n", "--max-tokens", type=int, default=None,
                    help=f"tokens per prompt (default {Settings.max_tokens})")
    ap.add_argument("--temps", type=_numbers, default=None, help="temperatures, comma-separated (default 0,0.8)")
    ap.add_argument("--per-category", type=int, default=None, help="prompts per Spec-Bench category (default 1)")
    ap.add_argument("--categories", default=None, help="comma-separated prompt categories (default: all)")
    ap.add_argument("--reps", type=int, default=Settings.reps, help="repetitions of each prompt (seeds differ)")
    ap.add_argument("--quick", action="store_true", help=f"one short prompt from each of {len(QUICK.categories)} "
                                                         f"categories, {QUICK.max_tokens} tokens, T=0")
    ap.add_argument("-t", "--threads", type=int, default=None,
                    help="this process's target threads (default: the plan's)")
    ap.add_argument("--worker-threads", type=int, default=None, help="threads of each rpc-server (default: its own)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    for name in ("max_tokens", "per_category", "reps", "threads", "worker_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    base = QUICK if args.quick else Settings(per_category=1, temperatures=(0.0, 0.8))
    changes = {k: v for k, v in (("max_tokens", args.max_tokens), ("per_category", args.per_category),
                                 ("temperatures", args.temps)) if v is not None}
    if args.categories:
        changes["categories"] = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    args.settings = dataclasses.replace(base, **changes, reps=args.reps)
    return args


def _numbers(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated numbers, not {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"numbers >= 0, not {text!r}")
    return values


def _ngl(text: str) -> int | str | None:
    if text == "plan":
        return None
    if text == "half":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of layers, 'half' or 'plan', not {text!r}") from None


# --- the rig: workers, proxies, engines -----------------------------------------------------

@contextlib.contextmanager
def rig(workers: int, delay_ms: float, threads: int | None):
    """`workers` rpc-server workers on 127.0.0.1, each behind a LatencyProxy of its own: yields
    the proxies' endpoints, for the rpc option."""
    from edge_spec.backends.rpc import Worker

    with contextlib.ExitStack() as stack:
        endpoints = []
        for _ in range(workers):
            worker = stack.enter_context(Worker(threads=threads))
            endpoints.append(stack.enter_context(LatencyProxy(worker.endpoint, delay_ms)).endpoint)
        yield tuple(endpoints)


def load_engines(args, ngl: int | None, plain_rpc: tuple[str, ...], spec_rpc: tuple[str, ...]):
    """The plain engine and edgespec's, the target of each split over its own workers (`ngl` of
    its layers there; None: the plan's split). The one place that knows the RPC options."""
    from edge_spec.options import EngineOptions
    from edge_spec.pipeline.engine import Engine

    common = dict(model=args.model, n_gpu_layers=ngl, n_threads=args.threads, history=False)
    plain = Engine.load(EngineOptions.of(**common, rpc=plain_rpc, plain=True))
    try:
        spec = Engine.load(EngineOptions.of(**common, draft=args.draft, rpc=spec_rpc))
    except BaseException:
        plain.close()
        raise
    return plain, spec


def target_layers(model: str | None) -> int:
    from edge_spec.models.gguf_facts import facts
    from edge_spec.models.registry import DEFAULT_TARGET
    from edge_spec.pipeline.resolve import resolve_model

    return facts(resolve_model(model, DEFAULT_TARGET)).n_layers


# --- one latency --------------------------------------------------------------------------------

def run_latency(args, delay_ms: float, ngl: int | None, prompts) -> tuple[list[dict], str]:
    """Every prompt and temperature at one added latency: summarize's rows (plus category and
    latency), and what edgespec ran."""
    with rig(args.workers, delay_ms, args.worker_threads) as plain_rpc, \
            rig(args.workers, delay_ms, args.worker_threads) as spec_rpc:
        plain, spec = load_engines(args, ngl, plain_rpc, spec_rpc)
        try:
            strategy = spec.plan.chosen.describe(spec.plan.target, spec.plan.drafter) if spec.plan else "unplanned"
            print(f"+{delay_ms:g} ms: edgespec runs {strategy}", file=sys.stderr)
            calibrated = copy.deepcopy(spec.runtime.controller)
            rows = []
            for p in prompts:
                for temp in args.settings.temperatures:
                    row = measure(plain, spec, calibrated, p.id, p.text, temp, args.settings.max_tokens,
                                  args.settings.reps) | {"category": p.category, "latency_ms": delay_ms}
                    rows.append(row)
                    print(f"+{delay_ms:g} ms  {p.id:<14} T={temp:<4g} plain {row['plain_tps']:6.2f} tok/s  "
                          f"edgespec {row['edgespec_tps']:6.2f} tok/s  ratio {row['ratio']:.2f}  "
                          f"acceptance {row['acceptance']:.2f}", file=sys.stderr, flush=True)
        finally:
            spec.close()
            plain.close()
    return rows, strategy


def measure(plain, spec, calibrated, name: str, text: str, temperature: float, max_tokens: int, reps: int) -> dict:
    """benchmark.Bench.measure with the plain run on an engine of its own (Bench's second context
    of one target cannot share an rpc-server): `reps` interleaved pairs, seeds 1000, 1001, ..."""
    from edge_spec.types import SamplingParams

    prompt = spec.chat_tokens([{"role": "user", "content": text}])
    runs = {"plain": [], "edgespec": []}
    for rep in range(reps):
        sp = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=1000 + rep)
        # a fork: what the engine runs; interleaved, its drafting thread waits while plain decoding steps
        speculative = spec.runtime.fork(controller=calibrated, interleaved=True)
        for label, stats in benchmark.interleaved({"plain": plain.runtime, "edgespec": speculative},
                                                  prompt, sp).items():
            runs[label].append(stats)
    return benchmark.summarize(name, temperature, runs)


# --- the table ----------------------------------------------------------------------------------

def pool(rows: list[dict], latencies) -> list[dict]:
    """Rows pooled per latency and temperature (then "all" temperatures), as benchmark.by_category
    pools categories; ratio_to_base: the ratio over the same group's at the lowest latency."""
    table = []
    for latency in latencies:
        at = [r | {"category": f"T={r['temperature']:g}"} for r in rows if r["latency_ms"] == latency]
        for c in benchmark.by_category(at):
            group = c.pop("category")
            table.append({"latency_ms": latency, "group": group, **c})
    base = {c["group"]: c["ratio"] for c in table if c["latency_ms"] == min(latencies)}
    for c in table:
        c["ratio_to_base"] = round(c["ratio"] / base[c["group"]], 3) if base.get(c["group"]) else None
    return table


def format_table(table: list[dict]) -> str:
    base = min(c["latency_ms"] for c in table)
    lines = [f"| added round trip | T | prompts | tokens | plain tok/s | edgespec tok/s | ratio "
             f"| ratio / ratio at {base:g} ms | acceptance |", "|---|---|---|---|---|---|---|---|---|"]
    for c in table:
        vs = f"{c['ratio_to_base']:.2f}" if c["ratio_to_base"] is not None else "-"
        lines.append(f"| {c['latency_ms']:g} ms | {c['group'].removeprefix('T=')} | {c['prompts']} | {c['tokens']} | "
                     f"{c['plain_tps']:.2f} | {c['edgespec_tps']:.2f} | **{c['ratio']:.2f}x** | {vs} | "
                     f"{c['acceptance']:.2f} |")
    return "\n".join(lines)


def conclusions(table: list[dict]) -> list[str]:
    """One line per added latency: edgespec's overall ratio against the lowest latency's."""
    overall = {}  # latency -> its last group ("all" temperatures, or the only one)
    for c in table:
        overall[c["latency_ms"]] = c
    base = min(overall)
    out = []
    for latency, c in overall.items():
        if latency == base:
            continue
        ref = overall[base]["ratio"]
        verdict = "above" if c["ratio"] > ref else "not above"
        times = f" ({c['ratio_to_base']:.2f} times it)" if c["ratio_to_base"] is not None else ""
        out.append(f"+{latency:g} ms: edgespec {c['ratio']:.2f}x plain, {verdict} its {ref:.2f}x "
                   f"at +{base:g} ms{times}")
    return out


def reproduce(argv: list[str]) -> str:
    return shlex.join([".venv/bin/python", "bench/rpc.py", *argv])


if __name__ == "__main__":
    main()
