"""`edgespec bench`: how much faster edgespec makes a model on this machine, per kind of prompt."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from edge_spec import __version__ as version
from edge_spec.options import EngineOptions
from edge_spec.surfaces import benchmark
from edge_spec.surfaces.benchmark import QUICK, Settings
from edge_spec.surfaces.cli.common import cli_flags, engine_command
from edge_spec.types import EdgespecError

S = Settings()


@engine_command
def bench_command(
    options: EngineOptions,
    quick: bool = typer.Option(False, "--quick", help=f"About a minute: one short prompt from each of {len(QUICK.categories)} "
                                                      f"categories, {QUICK.max_tokens} tokens each."),
    categories: Optional[str] = typer.Option(None, "--categories", show_default=False,
                                             help="Comma-separated prompt categories (default: all; --list-categories shows them)."),
    per_category: Optional[int] = typer.Option(None, "--per-category", show_default=False,
                                               help=f"Prompts per category (default {S.per_category}; --quick {QUICK.per_category})."),
    n: Optional[int] = typer.Option(None, "-n", "--max-tokens", show_default=False,
                                    help=f"Tokens generated per prompt (default {S.max_tokens}; --quick {QUICK.max_tokens})."),
    temps: str = typer.Option(",".join(map(str, S.temperatures)), "--temps", help="Comma-separated temperatures."),
    reps: int = typer.Option(S.reps, "--reps", help="Repetitions of each prompt (seeds differ at T > 0)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON (one record per category, "
                                                       "like `llama-bench -o json`) instead of the table."),
    plot: Optional[Path] = typer.Option(None, "--plot", show_default=False, metavar="FILE.png",
                                        help="Also draw a bar chart per category (needs matplotlib: "
                                             "pip install 'edgespec\\[plot]')."),
    list_categories: bool = typer.Option(False, "--list-categories", help="List the prompt categories and exit."),
    e2e: bool = typer.Option(False, "--e2e", help="Also time whole processes, `edgespec generate` against "
                             "`edgespec generate --plain` with the same options, start-up included (ABAB)."),
    e2e_reps: int = typer.Option(3, "--e2e-reps", help="Pairs of whole processes per prompt with --e2e."),
) -> None:
    """Measure plain decoding against edgespec on your machine, per kind of prompt.

    Both run interleaved, step by step, on two contexts of one loaded model (the machine's drift cancels out),
    edgespec as `chat` would run with the same options.

    Prompts: Spec-Bench's questions (chat, writing, coding, extraction, translation, summarization, QA, maths, RAG)."""
    prompts = benchmark.load_prompts()
    if list_categories:
        for name in benchmark.categories(prompts):
            typer.echo(f"{name} ({sum(p.category == name for p in prompts)} prompts)")
        return
    if plot is not None:
        _check_matplotlib()
    settings = _settings(quick, categories, per_category, n, temps, reps)
    if e2e_reps < 1:
        raise EdgespecError("--e2e-reps must be >= 1")
    run_bench(options, settings, benchmark.select(prompts, settings), as_json, plot, e2e_reps if e2e else 0)


def _check_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise EdgespecError("--plot needs matplotlib, which is not installed: pip install 'edgespec[plot]'")


def _settings(quick: bool, categories: str | None, per_category: int | None, n: int | None,
              temps: str, reps: int) -> Settings:
    import dataclasses

    base = QUICK if quick else Settings()
    try:
        temperatures = tuple(float(t) for t in temps.split(","))
    except ValueError:
        raise EdgespecError(f"--temps must be comma-separated numbers, not {temps!r}") from None
    if any(t < 0 for t in temperatures) or reps < 1 or (n is not None and n < 1) or (per_category is not None and per_category < 1):
        raise EdgespecError("--temps must be >= 0, and --reps, -n and --per-category >= 1")
    changes = {"temperatures": temperatures, "reps": reps}
    if categories:
        changes["categories"] = tuple(c.strip() for c in categories.split(",") if c.strip())
    if per_category is not None:
        changes["per_category"] = per_category
    if n is not None:
        changes["max_tokens"] = n
    return dataclasses.replace(base, **changes)


def run_bench(options: EngineOptions, settings: Settings, prompts, as_json: bool, plot: Path | None,
              e2e_reps: int = 0) -> None:
    from rich.console import Console

    # the engine is heavy (llama.cpp): imported when a bench runs, not for --help
    from edge_spec.surfaces.cli.chat import load_engine, plan_lines

    err = Console(stderr=True, highlight=False)
    started = time.time()
    engine = load_engine(options)
    try:
        for line in plan_lines(engine):
            err.print(line, soft_wrap=True, markup=False)
        rows = _measure(engine, prompts, settings, err)
        facts = _describe(engine, settings)
    finally:
        engine.close()
    e2e_rows = _measure_e2e(options, prompts, settings, e2e_reps, err) if e2e_reps else []
    table = benchmark.by_category(rows)
    e2e_table = benchmark.e2e_by_category(e2e_rows) if e2e_rows else []
    if as_json:
        import json

        typer.echo(json.dumps(_records(facts, table, rows, e2e_table, e2e_rows), indent=1))
    else:
        print_table(Console(highlight=False), facts, table)
        if e2e_table:
            print_e2e_table(Console(highlight=False), e2e_table, e2e_reps)
    if plot is not None:
        draw(plot, facts, table)
        err.print(f"edgespec: plot written to {plot}", markup=False)
    for line in divergence_lines(rows):
        err.print(line, markup=False, soft_wrap=True)
    err.print(f"edgespec: bench took {time.time() - started:.0f} s", markup=False)


def _measure(engine, prompts, settings: Settings, console) -> list[dict]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("benchmarking", total=len(prompts) * len(settings.temperatures))

        def done(row: dict) -> None:
            bar.update(task, advance=1, description=f"{row['category']}: {row['prompt']} ratio {row['ratio']:.2f}")

        return benchmark.run(engine, prompts, settings, done)


def _describe(engine, settings: Settings) -> dict:
    """What was measured, for the table's title and the JSON records."""
    import os
    import platform
    from datetime import datetime, timezone

    # reading the GGUF header brings numpy: imported when a bench reports
    from edge_spec.models.gguf_facts import facts

    target = facts(engine.target.facts.path)
    p = engine.plan
    drafter = engine.draft_backend.facts.path if engine.draft_backend is not None else None
    strategy = p.chosen.describe(p.target, p.drafter) if p else None
    if drafter is not None and p is not None and p.chosen.strategy != "draft":
        strategy += f"; -md {os.path.basename(drafter)} drafts where the controller finds it pays"
    return {
        "edgespec_version": version, "test_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_info": platform.processor() or platform.machine(), "profile": p.profile if p else None,
        "model_filename": target.path, "model_type": f"{target.architecture} {target.quantization}",
        "model_size": target.size, "drafter_filename": drafter,
        "strategy": strategy,
        "n_threads": engine.target.n_threads, "n_gen": settings.max_tokens,
        "temperatures": list(settings.temperatures), "reps": settings.reps,
        "model_name": os.path.basename(target.path),
    }


def _records(facts: dict, table: list[dict], rows: list[dict], e2e_table: list[dict] = (),
             e2e_rows: list[dict] = ()) -> list[dict]:
    """One self-contained record per category, as llama-bench -o json prints one per test; with
    --e2e each also has an `end_to_end` record (whole processes) and its samples."""
    per_prompt, e2e, e2e_samples = {}, {c["category"]: c for c in e2e_table}, {}
    for r in rows:
        per_prompt.setdefault(r["category"], []).append(
            {k: r[k] for k in ("prompt", "temperature", "compared_tokens", "plain_tps", "edgespec_tps", "ratio",
                               "acceptance", "tokens_per_pass", "divergences")})
    for r in e2e_rows:
        e2e_samples.setdefault(r["category"], []).append(r)
    return [facts | c | {"samples": per_prompt.get(c["category"], [])}
            | ({"end_to_end": e2e[c["category"]] | {"samples": e2e_samples.get(c["category"], [])}}
               if c["category"] in e2e else {})
            for c in table]


def _measure_e2e(options: EngineOptions, prompts, settings: Settings, reps: int, console) -> list[dict]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("whole processes", total=len(prompts) * len(settings.temperatures))

        def done(row: dict) -> None:
            bar.update(task, advance=1, description=f"{row['category']}: {row['prompt']} end to end {row['ratio']:.2f}")

        return benchmark.end_to_end(cli_flags(options), prompts, settings, reps, done)


def print_e2e_table(console, table: list[dict], reps: int) -> None:
    from rich.table import Table

    out = Table(title=f"end to end: process start to last token, median of {reps} ABAB pairs",
                title_justify="left")
    for col in ("category", "prompts", "plain s", "edgespec s", "ratio", "range"):
        out.add_column(col, justify="left" if col == "category" else "right", no_wrap=col == "category")
    for c in table:
        lo, hi = c["ratio_range"]
        out.add_row(c["category"], str(c["prompts"]), f"{c['plain_seconds']:.1f}", f"{c['edgespec_seconds']:.1f}",
                    f"{c['ratio']:.2f}x", f"{lo:.2f}-{hi:.2f}", style="bold" if c["category"] == "all" else None,
                    end_section=c is table[-2] and len(table) > 1)
    console.print(out)


def print_table(console, facts: dict, table: list[dict]) -> None:
    from rich.table import Table

    title = f"{facts['model_name']} ({facts['model_type']}), {facts['n_gen']} tokens per prompt, " \
            f"{facts['n_threads']} threads: {facts['strategy']}"
    out = Table(title=title, title_justify="left")
    for col in ("category", "prompts", "tokens", "plain tok/s", "edgespec tok/s", "ratio", "acceptance"):
        out.add_column(col, justify="left" if col == "category" else "right", no_wrap=col == "category")
    for c in table:
        out.add_row(c["category"], str(c["prompts"]), str(c["tokens"]), f"{c['plain_tps']:.1f}",
                    f"{c['edgespec_tps']:.1f}", f"{c['ratio']:.2f}x", f"{c['acceptance']:.2f}",
                    style="bold" if c["category"] == "all" else None, end_section=c is table[-2] and len(table) > 1)
    console.print(out)


def draw(path: Path, facts: dict, table: list[dict]) -> None:
    """Grouped bars per category: plain and edgespec tokens/s, the ratio above each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c["category"] for c in table]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2), 4.5))
    plain = ax.bar([x - 0.2 for x in xs], [c["plain_tps"] for c in table], 0.4, label="plain")
    spec = ax.bar([x + 0.2 for x in xs], [c["edgespec_tps"] for c in table], 0.4, label="edgespec")
    for bar, c in zip(spec, table):
        ax.annotate(f"{c['ratio']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{facts['model_name']}: plain vs edgespec", fontsize=10)
    ax.legend(handles=[plain, spec])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def divergence_lines(rows: list[dict]) -> list[str]:
    """At T = 0, where edgespec's reply left plain decoding's, and whether each was a near-tie."""
    found = [(r["prompt"], d) for r in rows for d in r.get("divergences", ())]
    if not found:
        return []
    far = [(name, d) for name, d in found if d["margin"] >= benchmark.NEAR_TIE]
    head = (f"edgespec: greedy: {len(found)} repl{'y' if len(found) == 1 else 'ies'} left plain decoding's text, "
            f"at a top-2 margin of at most {max(d['margin'] for _, d in found):.3f} logits")
    if not far:
        return [head + f" (near-ties: below {benchmark.NEAR_TIE}, the noise of batched verification)"]
    return [head] + [f"edgespec: warning: {name} left plain decoding's text at token {d['at']} with a top-2 margin "
                     f"of {d['margin']:.3f}: not a near-tie, please report it" for name, d in far]
