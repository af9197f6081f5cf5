"""Plain decoding vs edgespec on this machine, side by side: the method of `edgespec bench` and
of the developers' bench/speculative.py.

Same target weights, same threads, same prompts. The two generations run *interleaved*: plain
decoding on one llama.cpp context and edgespec on another context of the same loaded model,
advancing whichever has used less time so far, one step at a time. Both therefore see the same
machine at the same moments, and the drift of a shared machine cancels out of the ratio. Each
edgespec run is a fork of the engine's runtime (its drafters, decoding and schedule) from the
controller state right after calibration (nothing learned from earlier prompts).

The prompts (data/prompts.jsonl, see data/PROMPTS.md) are Spec-Bench's questions by category
(Apache-2.0) and the three prompts edgespec was first benchmarked with (category "fixed").
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_spec.types import EdgespecError, SamplingParams

PROMPTS_FILE = Path(__file__).resolve().parent.parent / "data" / "prompts.jsonl"


@dataclass(frozen=True)
class Prompt:
    id: str
    category: str
    text: str  # the first turn


@dataclass(frozen=True)
class Settings:
    """Every default of `edgespec bench` lives here; the CLI reads them."""

    per_category: int = 2
    max_tokens: int = 128
    temperatures: tuple[float, ...] = (0.0,)
    reps: int = 1
    categories: tuple[str, ...] = ()     # () = every category
    max_prompt_chars: int = 0            # 0 = any length; else the prompts up to this long


# --quick: about a minute on the default pair on a 2-core machine: one short prompt from each of
# seven categories (summarization and RAG prompts run 3,000+ characters: their prompt evaluation
# alone would take most of the minute), 48 tokens each, greedy.
QUICK = Settings(per_category=1, max_tokens=48, max_prompt_chars=1000,
                 categories=("fixed", "writing", "coding", "extraction", "translation", "qa", "math_reasoning"))


def load_prompts() -> list[Prompt]:
    """Every prompt shipped with the package, in file order."""
    text = PROMPTS_FILE.read_text(encoding="utf-8")
    rows = (json.loads(line) for line in text.splitlines() if line.strip())
    return [Prompt(str(r["id"]), r["category"], r["turns"][0]) for r in rows]


def categories(prompts: Iterable[Prompt]) -> list[str]:
    return list(dict.fromkeys(p.category for p in prompts))


def select(prompts: list[Prompt], settings: Settings) -> list[Prompt]:
    """settings.per_category prompts of each category asked for (the shortest when a length cap
    is set, else the first in file order)."""
    known = categories(prompts)
    wanted = settings.categories or tuple(known)
    unknown = [c for c in wanted if c not in known]
    if unknown:
        raise EdgespecError(f"unknown prompt categories {', '.join(unknown)}; known: {', '.join(known)}")
    out = []
    for category in wanted:
        pool = [p for p in prompts if p.category == category]
        if settings.max_prompt_chars:
            pool = sorted((p for p in pool if len(p.text) <= settings.max_prompt_chars), key=lambda p: len(p.text))
        out.extend(pool[:settings.per_category])
    return out


def pick(prompts: list[Prompt], names: str) -> list[Prompt]:
    """Prompts by a comma-separated list of ids ("chat", "specbench-81") and categories (each
    category: all its prompts), for the developers' benchmarks."""
    out = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        found = [p for p in prompts if name in (p.id, p.category)]
        if not found:
            raise EdgespecError(f"no prompt or category {name!r}; categories: {', '.join(categories(prompts))}")
        out.extend(found)
    return out


# --- the interleaved measurement -------------------------------------------------------------

def interleaved(runtimes: dict, prompt: list[int], sp, grammar=None) -> dict[str, dict]:
    """Run generations step by step, next step to whichever has used the least time.

    Also records each one's decode time after every step, so that runs of different lengths
    (EOS at different places, as at T > 0) are compared over the same number of tokens: later
    tokens cost more (a longer context), and a short run would look faster per token.
    `grammar`: a compiled grammar (Engine.grammar) every run follows, each with a matcher of its own.
    """
    gens = {label: rt.generate(prompt, sp, grammar=None if grammar is None else grammar.matcher())
            for label, rt in runtimes.items()}
    busy = dict.fromkeys(gens, 0.0)
    trace = {label: [] for label in gens}  # (tokens so far, decode seconds so far)
    tokens = {label: [] for label in gens}
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
            tokens[label].extend(step.tokens)
            trace[label].append((step.stats.n_tokens, busy[label] - step.stats.prompt_seconds))
    out = {}
    for label, step in last.items():
        stats = step.stats.as_dict()
        # decode time = time inside this generator minus its prompt evaluation
        stats["decode_seconds"] = busy[label] - step.stats.prompt_seconds
        out[label] = stats | {"finish": step.finish_reason, "trace": trace[label], "token_ids": tokens[label]}
    return out


# Batched verification is not bit-exact against one-token decoding: llama.cpp's quantized kernels
# take another path for several tokens (bench/greedy.py measures how far logits move), so greedy
# speculation may pick the other token where plain decoding's top two logits nearly tie. A flip
# needs a top-2 margin below twice the largest move: bench/greedy.py measured moves of up to 0.84
# logits for the default target on this project's CI machine kind (batches of 2 to 17 tokens).
NEAR_TIE = 1.7


def greedy_divergence(context, prompt: list[int], plain: list[int], spec: list[int], grammar=None) -> dict | None:
    """Where a greedy speculative reply first departs from plain decoding's, and the target's
    top-2 logit margin there as plain decoding saw it (replayed one token at a time on
    `context`, a backend of the target; among the tokens `grammar` allows there, when the replies
    followed one): {"at": token index, "margin": logits}; None when equal."""
    at = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), None)
    if at is None:
        return None
    context.truncate(0)
    context.forward(prompt[:-1], logits="none")
    for token in [prompt[-1], *plain[:at]]:
        logits = context.forward([token], logits="last")[-1]
    if grammar is not None:
        matcher = grammar.matcher()
        for token in plain[:at]:
            matcher.consume(token)
        logits = np.where(matcher.mask()[: len(logits)], logits, -np.inf)
    top2 = np.partition(logits, -2)[-2:]
    return {"at": at, "margin": round(float(top2[1] - top2[0]), 4)}


def seconds_for(trace: list, n: int) -> float:
    """Decode seconds spent to produce the first n tokens (prorated within the step that crossed n)."""
    prev_tokens, prev_seconds = 0, 0.0
    for tokens, seconds in trace:
        if tokens >= n:
            return prev_seconds + (seconds - prev_seconds) * (n - prev_tokens) / max(tokens - prev_tokens, 1)
        prev_tokens, prev_seconds = tokens, seconds
    return prev_seconds


def summarize(name: str, temp: float, runs: dict, divergences: list | None = None, keep_tokens: bool = False) -> dict:
    """Rates over the tokens both runs of a pair produced, pooled over repetitions; keeps the
    seconds compared so that rows can be pooled again (by category)."""
    pairs = list(zip(runs["plain"], runs["edgespec"]))
    common = [min(p["tokens"], s["tokens"]) for p, s in pairs]
    plain_s = [seconds_for(p["trace"], n) for (p, _), n in zip(pairs, common)]
    spec_s = [seconds_for(s["trace"], n) for (_, s), n in zip(pairs, common)]
    spec = runs["edgespec"]
    drafted = sum(r["drafted"] for r in spec)
    for r in runs["plain"] + spec:
        del r["trace"]
        if not keep_tokens:
            del r["token_ids"]
    return {
        "prompt": name, "temperature": temp, "compared_tokens": common,
        "plain_seconds": sum(plain_s), "edgespec_seconds": sum(spec_s),
        "plain_tps": _rate(sum(common), sum(plain_s)), "edgespec_tps": _rate(sum(common), sum(spec_s)),
        "ratio": round(sum(plain_s) / sum(spec_s), 3) if sum(spec_s) else 0.0,
        "ratio_per_rep": [round(p / s, 3) if s else 0.0 for p, s in zip(plain_s, spec_s)],
        "drafted": drafted, "accepted": sum(r["accepted"] for r in spec),
        "acceptance": round(sum(r["accepted"] for r in spec) / drafted, 3) if drafted else 0.0,
        "tokens_per_pass": round(statistics.mean(r["mean_accepted_length"] for r in spec), 3),
        "divergences": [d for d in divergences or () if d is not None],  # T = 0: where spec left plain
        "runs": runs,
    }


def _rate(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 2) if seconds else 0.0


class Bench:
    """Plain decoding and the engine's speculative runtime on two contexts of one loaded target:
    the speculative runs are forks of the engine's runtime (its drafters, decoding and schedule,
    trees included), each from the controller state right after calibration."""

    def __init__(self, engine):
        # the runtime brings numpy and the drafters: imported when a bench runs, not for --help
        from edge_spec.core.runtime import Decoding, Runtime

        if not engine.target.capabilities.siblings:
            raise EdgespecError("the benchmark runs plain decoding on a second context of the target, which only "
                                "the llama.cpp backend has: use --backend llama")
        self.engine = engine
        self.plain_context = engine.target.sibling()
        # plain decoding drafts nothing, not even a grammar's forced spans: one token per target pass
        self.plain = Runtime.from_plan(Decoding(ngram=False, grammar_drafts=False), self.plain_context)
        self.calibrated = engine.runtime.controller

    def measure(self, name: str, text: str, temperature: float, max_tokens: int, reps: int) -> dict:
        """One prompt at one temperature, `reps` interleaved pairs (seeds 1000, 1001, ...)."""
        prompt = self.engine.chat_tokens([{"role": "user", "content": text}])
        return self.measure_tokens(name, prompt, temperature, max_tokens, reps)

    def measure_tokens(self, name: str, prompt: list[int], temperature: float, max_tokens: int, reps: int,
                       grammar=None, keep_tokens: bool = False) -> dict:
        """measure() on a prompt's tokens; `grammar` (Engine.grammar's): both runs follow it, plain
        decoding one token per pass. keep_tokens: the row keeps each run's token ids."""
        engine = self.engine
        runs = {"plain": [], "edgespec": []}
        divergences = []
        for rep in range(reps):
            sp = SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=1000 + rep)
            spec = engine.runtime.fork(controller=self.calibrated, interleaved=True)
            result = interleaved({"plain": self.plain, "edgespec": spec}, prompt, sp, grammar)
            if sp.greedy:
                divergences.append(greedy_divergence(self.plain_context, prompt, result["plain"]["token_ids"],
                                                     result["edgespec"]["token_ids"], grammar))
            for label, stats in result.items():
                runs[label].append(stats)
        return summarize(name, temperature, runs, divergences, keep_tokens)

    def close(self) -> None:
        self.plain_context.close()


def run(engine, prompts: list[Prompt], settings: Settings,
        done: Callable[[dict], None] | None = None) -> list[dict]:
    """A row (summarize's, plus the category) per prompt and temperature; done(row) after each."""
    bench = Bench(engine)
    rows = []
    try:
        for p in prompts:
            for temp in settings.temperatures:
                row = bench.measure(p.id, p.text, temp, settings.max_tokens, settings.reps) | {"category": p.category}
                rows.append(row)
                if done:
                    done(row)
    finally:
        bench.close()
    return rows


def by_category(rows: list[dict]) -> list[dict]:
    """Rows pooled per category (seconds and tokens summed, so long replies weigh more), then "all"."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["category"], []).append(r)
    out = [_pool(name, group) for name, group in groups.items()]
    return out + [_pool("all", rows)] if len(groups) > 1 else out


def _pool(name: str, rows: list[dict]) -> dict:
    tokens = sum(sum(r["compared_tokens"]) for r in rows)
    plain_s, spec_s = sum(r["plain_seconds"] for r in rows), sum(r["edgespec_seconds"] for r in rows)
    drafted, accepted = sum(r["drafted"] for r in rows), sum(r["accepted"] for r in rows)
    return {
        "category": name, "prompts": len({r["prompt"] for r in rows}), "tokens": tokens,
        "plain_tps": _rate(tokens, plain_s), "edgespec_tps": _rate(tokens, spec_s),
        "ratio": round(plain_s / spec_s, 3) if spec_s else 0.0,
        "acceptance": round(accepted / drafted, 3) if drafted else 0.0,
        "ratio_per_prompt": [r["ratio"] for r in rows],
    }


# --- whole processes: what a user waits for, start-up included ---------------------------------

def whole_process(flags: list[str], prompt_file: Path, temperature: float, max_tokens: int, seed: int) -> dict:
    """One `edgespec generate` process on the prompt in `prompt_file`: its stats, with the seconds
    from its start to its last token (`elapsed_seconds`)."""
    done = subprocess.run([sys.executable, "-m", "edge_spec.surfaces.cli", "generate", *flags, "-f", str(prompt_file),
                           "-n", str(max_tokens), "--temp", str(temperature), "--seed", str(seed), "--stats", "json"],
                          capture_output=True, text=True)
    lines = [line for line in done.stderr.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise EdgespecError(f"edgespec generate {' '.join(flags)} failed: {done.stderr.strip()[-600:]}")
    return json.loads(lines[-1])


def end_to_end(flags: list[str], prompts: list[Prompt], settings: Settings, reps: int,
               done: Callable[[dict], None] | None = None) -> list[dict]:
    """Whole processes of edgespec (with `flags`) and of `--plain` (the same flags), interleaved
    ABAB, `reps` pairs per prompt and temperature, each pair with its own seed (the same for both,
    so n-gram drafts give plain decoding's very text). A row per prompt and temperature: the
    median seconds from process start to last token of each, and their ratio."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgespec-bench-") as tmp:
        for p in prompts:
            prompt_file = Path(tmp) / f"{p.id}.txt"
            prompt_file.write_text(p.text, encoding="utf-8")
            for temp in settings.temperatures:
                runs = {"edgespec": [], "plain": []}
                for rep in range(reps):
                    for label in runs:
                        runs[label].append(whole_process(flags + ["--plain"] * (label == "plain"), prompt_file, temp,
                                                         settings.max_tokens, 2000 + rep))
                row = e2e_row(p.id, temp, runs) | {"category": p.category}
                rows.append(row)
                if done:
                    done(row)
    return rows


def e2e_row(name: str, temp: float, runs: dict) -> dict:
    seconds = {label: [r["elapsed_seconds"] for r in rs] for label, rs in runs.items()}
    tokens = {label: [r["tokens"] for r in rs] for label, rs in runs.items()}
    pair_ratios = [p / s for p, s in zip(seconds["plain"], seconds["edgespec"])]
    return {
        "prompt": name, "temperature": temp,
        "plain_seconds": statistics.median(seconds["plain"]), "edgespec_seconds": statistics.median(seconds["edgespec"]),
        "plain_tokens": statistics.median(tokens["plain"]), "edgespec_tokens": statistics.median(tokens["edgespec"]),
        "ratio": round(statistics.median(seconds["plain"]) / statistics.median(seconds["edgespec"]), 3),
        "ratio_spread": (round(min(pair_ratios), 3), round(max(pair_ratios), 3)),
        "seconds": seconds,
        "runs": runs,  # each process's stats: load and prompt time can be told from decode time
    }


def e2e_by_category(rows: list[dict]) -> list[dict]:
    """Rows pooled per category (median seconds summed: long replies weigh more), then "all":
    the time-weighted ratio of plain's seconds to edgespec's."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["category"], []).append(r)
    out = []
    for name, group in [*groups.items(), *((("all", rows),) if len(groups) > 1 else ())]:
        plain, spec = sum(r["plain_seconds"] for r in group), sum(r["edgespec_seconds"] for r in group)
        out.append({"category": name, "prompts": len({r["prompt"] for r in group}), "plain_seconds": round(plain, 2),
                    "edgespec_seconds": round(spec, 2), "ratio": round(plain / spec, 3) if spec else 0.0,
                    "ratio_range": (min(r["ratio"] for r in group), max(r["ratio"] for r in group))})
    return out
