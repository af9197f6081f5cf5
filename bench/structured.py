"""Structured output: plain decoding with a grammar against edgespec with grammar-aware drafts, on
the default pair, resident.

The items (bench/structured_items.json, written for edgespec in the manner of JSONSchemaBench):
14 extraction prompts, each with a JSON schema (OpenAI's json_schema, strict) given in the prompt,
and 6 tool-call prompts whose tools go through the model's chat template, the call forced as
tool_choice "required" does (models/tool_calls.py). Both runs follow the same grammar: plain
decoding masks the target's logits and emits one token per target pass; edgespec masks p and q
at every drafted position and proposes the spans the grammar forces as free drafts.

The method is `edgespec bench`'s (edge_spec/surfaces/benchmark.py): the two runs on two contexts of
one loaded target, interleaved step by step, so that the drift of a shared machine cancels out of
their ratio. Reported per item and pooled (seconds summed, so long replies weigh more): the ratio
of plain decoding's seconds to edgespec's over the tokens both produced, the fraction of emitted
tokens that came from forced spans ("forced"), acceptance and tokens per target pass, and whether
every reply validates against its schema (with the `jsonschema` package when installed).

    .venv/bin/python bench/structured.py [--items contact,weather] [-n 200] [--temps 0] [--reps 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_spec.models import tool_calls  # noqa: E402
from edge_spec.options import EngineOptions  # noqa: E402
from edge_spec.types import Grammar  # noqa: E402

ITEMS = Path(__file__).with_name("structured_items.json")
SYSTEM = "You extract information into JSON. Answer with the JSON object only."


def load_items(names: str | None = None) -> list[dict]:
    items = json.loads(ITEMS.read_text())
    if not names:
        return items
    wanted = names.split(",")
    unknown = sorted(set(wanted) - {i["id"] for i in items})
    if unknown:
        raise SystemExit(f"unknown items {unknown}; known: {', '.join(i['id'] for i in items)}")
    return [i for i in items if i["id"] in wanted]


def request(item: dict) -> tuple[list[dict], list[dict] | None, Grammar]:
    """(messages, tools or None, grammar) of an item, as the server would make them."""
    if item["kind"] == "tool":
        messages = [{"role": "user", "content": item["prompt"]}]
        return messages, item["tools"], tool_calls.call_grammar(item["tools"], None, parallel=False)
    schema = item["schema"]
    content = f"{item['prompt']}\n\nAnswer with JSON that follows this schema:\n{json.dumps(schema)}"
    return ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}], None,
            Grammar.json_schema(schema, strict=True))


def valid(item: dict, text: str, finish: str) -> bool | None:
    """Whether a finished reply matches its item's schema (None: cut by max_tokens, not judged)."""
    if finish != "stop":
        return None
    try:
        if item["kind"] == "tool":
            content, calls = tool_calls.parse(text)
            if len(calls) != 1 or content:
                return False
            function = next(t["function"] for t in item["tools"] if t["function"]["name"] == calls[0]["function"]["name"])
            return _validates(json.loads(calls[0]["function"]["arguments"]), function["parameters"])
        return _validates(json.loads(text), item["schema"])
    except (json.JSONDecodeError, StopIteration):
        return False


def _validates(value, schema: dict) -> bool:
    try:
        import jsonschema
    except ImportError:  # the test extra has it; without it only the JSON's syntax is checked
        return True
    try:
        jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
        return True
    except jsonschema.ValidationError:
        return False


def forced_fraction(run: dict) -> float:
    """Emitted tokens that came from a span the grammar forced (drafted for free, accepted)."""
    accepted = run["by_source"].get("grammar", {}).get("accepted", 0)
    return accepted / run["tokens"] if run["tokens"] else 0.0


def measure(bench, engine, item: dict, temperature: float, max_tokens: int, reps: int) -> dict:
    messages, tools, grammar = request(item)
    prompt = engine.chat_tokens(messages, tools)
    row = bench.measure_tokens(item["id"], prompt, temperature, max_tokens, reps, engine.grammar(grammar),
                               keep_tokens=True)
    checks = []
    for label in ("plain", "edgespec"):
        for run in row["runs"][label]:
            checks.append(valid(item, engine.target.detokenize(run.pop("token_ids")), run["finish"]))
    spec = row["runs"]["edgespec"]
    forced = sum(forced_fraction(r) * r["tokens"] for r in spec) / max(sum(r["tokens"] for r in spec), 1)
    return row | {"kind": item["kind"], "forced": round(forced, 3),
                  "valid": f"{checks.count(True)}/{len([c for c in checks if c is not None])}"}


def pooled(rows: list[dict]) -> dict:
    plain, spec = sum(r["plain_seconds"] for r in rows), sum(r["edgespec_seconds"] for r in rows)
    tokens = sum(sum(r["compared_tokens"]) for r in rows)
    forced = sum(r["forced"] * sum(r["compared_tokens"]) for r in rows) / max(tokens, 1)
    return {"items": len(rows), "tokens": tokens, "plain_tps": round(tokens / plain, 2) if plain else 0.0,
            "edgespec_tps": round(tokens / spec, 2) if spec else 0.0, "ratio": round(plain / spec, 3) if spec else 0.0,
            "forced": round(forced, 3), "ratio_range": (min(r["ratio"] for r in rows), max(r["ratio"] for r in rows))}


def option(text: str) -> tuple[str, object]:
    """`name=value` as an EngineOptions.of keyword: the value as JSON when it parses (3, true), else text."""
    name, _, value = text.partition("=")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def main() -> None:
    from edge_spec.pipeline.engine import Engine
    from edge_spec.surfaces.benchmark import Bench

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", default=None, help="item ids, comma-separated (default: all 20)")
    ap.add_argument("-n", "--max-tokens", type=int, default=200)
    ap.add_argument("--temps", default="0")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                    help="an engine option for edgespec's runs (EngineOptions.of), e.g. draft_length=3; repeatable")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    engine = Engine.load(EngineOptions.of(n_threads=args.threads, history=False, **dict(map(option, args.set))))
    plan = engine.plan
    print(f"edgespec runs: {plan.chosen.describe(plan.target, plan.drafter) if plan else 'unplanned'}, "
          f"{engine.runtime.decoding}", file=sys.stderr)
    bench = Bench(engine)
    rows = []
    try:
        for item in load_items(args.items):
            for temp in (float(t) for t in args.temps.split(",")):
                row = measure(bench, engine, item, temp, args.max_tokens, args.reps)
                rows.append(row)
                print(f"{row['prompt']:<14} {row['kind']:<8} T={temp:<4} plain {row['plain_tps']:6.2f} tok/s  "
                      f"edgespec {row['edgespec_tps']:6.2f} tok/s  ratio {row['ratio']:.2f}  forced {row['forced']:.2f}  "
                      f"acceptance {row['acceptance']:.2f}  tokens/pass {row['tokens_per_pass']:.2f}  "
                      f"valid {row['valid']}  divergences {row['divergences']}", flush=True)
    finally:
        bench.close()
        engine.close()
    summary = {kind: pooled([r for r in rows if r["kind"] == kind]) for kind in ("extract", "tool")
               if any(r["kind"] == kind for r in rows)} | {"all": pooled(rows)}
    print("\n| items | tokens | plain tok/s | edgespec tok/s | ratio | forced | ratio range |\n|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} ({s['items']}) | {s['tokens']} | {s['plain_tps']} | {s['edgespec_tps']} | **{s['ratio']}** | "
              f"{s['forced']} | {s['ratio_range'][0]}-{s['ratio_range'][1]} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "summary": summary, "args": vars(args) | {"out": str(args.out)}},
                                       indent=1))


if __name__ == "__main__":
    main()
