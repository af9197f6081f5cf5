"""`edgespec bench`: the shipped prompt set, the pooling per category, the CLI's errors, and
`--quick` end to end on the small test model (valid JSON and a PNG)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from edge_spec.surfaces import benchmark
from edge_spec.surfaces.benchmark import QUICK, Settings, by_category, load_prompts, pick, select

OLD_FIXED = {  # the three prompts the developers' benchmarks used before the shared set
    "chat": "Explain in a few paragraphs why the sky is blue, for a curious twelve-year-old.",
    "code": "Write a Python function that parses an INI-style configuration file into a nested "
            "dictionary, handling comments, blank lines and quoted values. Include a docstring.",
}


def test_the_prompt_set_covers_the_issue_categories_and_keeps_the_fixed_prompts():
    prompts = load_prompts()
    cats = set(benchmark.categories(prompts))
    for wanted in ("fixed", "writing", "roleplay", "coding", "extraction", "translation", "summarization", "qa",
                   "math", "math_reasoning", "rag"):
        assert wanted in cats
    fixed = {p.id: p.text for p in prompts if p.category == "fixed"}
    assert set(fixed) == {"chat", "code", "edit"}
    for key, text in OLD_FIXED.items():
        assert fixed[key] == text
    assert "def count_all" not in fixed["edit"] and "def total(self):" in fixed["edit"]
    assert len({p.id for p in prompts}) == len(prompts)  # ids are unique


def test_quick_picks_one_short_prompt_per_category():
    chosen = select(load_prompts(), QUICK)
    assert [p.category for p in chosen] == list(QUICK.categories)
    assert all(len(p.text) <= QUICK.max_prompt_chars for p in chosen)
    everything = select(load_prompts(), Settings(per_category=2))
    assert len(everything) == 2 * len(benchmark.categories(load_prompts()))


def test_pick_by_id_and_category_and_unknown_names():
    from edge_spec.types import EdgespecError

    prompts = load_prompts()
    assert [p.id for p in pick(prompts, "chat,code")] == ["chat", "code"]
    assert len(pick(prompts, "fixed")) == 3
    with pytest.raises(EdgespecError, match="no prompt or category 'nope'"):
        pick(prompts, "nope")
    with pytest.raises(EdgespecError, match="unknown prompt categories nope"):
        select(prompts, Settings(categories=("nope",)))


def row(category, prompt, tokens, plain_s, spec_s, drafted, accepted):
    return {"category": category, "prompt": prompt, "compared_tokens": [tokens], "plain_seconds": plain_s,
            "edgespec_seconds": spec_s, "drafted": drafted, "accepted": accepted, "ratio": round(plain_s / spec_s, 3)}


def test_categories_pool_seconds_and_tokens():
    rows = [row("a", "a1", 100, 10.0, 5.0, 80, 60), row("a", "a2", 50, 5.0, 5.0, 20, 10),
            row("b", "b1", 100, 10.0, 8.0, 0, 0)]
    table = {c["category"]: c for c in by_category(rows)}
    assert table["a"]["plain_tps"] == 10.0 and table["a"]["edgespec_tps"] == 15.0
    assert table["a"]["ratio"] == 1.5 and table["a"]["acceptance"] == 0.7 and table["a"]["prompts"] == 2
    assert table["b"]["acceptance"] == 0.0
    assert table["all"]["tokens"] == 250 and table["all"]["ratio"] == round(25 / 18, 3)


def test_seconds_for_prorates_within_a_step():
    trace = [(1, 0.1), (5, 0.5), (6, 0.7)]
    assert benchmark.seconds_for(trace, 3) == pytest.approx(0.3)
    assert benchmark.seconds_for(trace, 6) == pytest.approx(0.7)


def edgespec(*args, timeout=600):
    env = os.environ | {"NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "edge_spec.surfaces.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_plot_without_matplotlib_is_one_line(monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from edge_spec.surfaces.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    r = CliRunner().invoke(app, ["bench", "--quick", "--plot", "out.png"])
    assert r.exit_code == 1
    assert r.output.strip() == ("edgespec: error: --plot needs matplotlib, which is not installed: "
                                "pip install 'edgespec[plot]'")


def test_bad_options_are_one_line():
    r = edgespec("bench", "--categories", "nope", timeout=60)
    assert r.returncode == 1 and "unknown prompt categories nope" in r.stderr and "Traceback" not in r.stderr
    r = edgespec("bench", "--temps", "hot", timeout=60)
    assert r.returncode == 1 and "--temps must be comma-separated numbers" in r.stderr


@pytest.mark.real
def test_quick_bench_on_the_small_model_writes_json_and_a_png(tmp_path):
    png = tmp_path / "bench.png"
    smol = "smollm2-135m-instruct-q4_1"
    started = time.perf_counter()
    r = edgespec("bench", smol, "-md", smol, "--quick", "--json", "--plot", str(png))
    seconds = time.perf_counter() - started
    assert r.returncode == 0, r.stderr
    records = json.loads(r.stdout)
    cats = [rec["category"] for rec in records]
    assert cats == [*QUICK.categories, "all"]
    for rec in records:
        assert rec["model_type"] == "llama Q4_1" and rec["n_gen"] == QUICK.max_tokens
        assert rec["plain_tps"] > 0
        assert rec["edgespec_tps"] > 0 and rec["ratio"] > 0
    everything = records[-1]
    assert everything["tokens"] >= len(QUICK.categories) * 8
    assert 0 <= everything["acceptance"] <= 1  # the controller drafts with the model only while it pays
    assert everything["drafter_filename"].endswith(f"{smol}.gguf")  # -md was loaded
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written to" in r.stderr and "bench took" in r.stderr
    print(f"edgespec bench --quick on {smol}: {seconds:.0f} s")


def test_the_bench_runs_what_the_engine_runs_trees_included(tmp_path, monkeypatch):
    """The edgespec side of the bench is a fork of the engine's runtime: with trees planned (here
    asked for), the target verifies trees in the bench too (it ran chains before `Runtime.fork`)."""
    from edge_spec.options import EngineOptions
    from edge_spec.pipeline.engine import Engine
    from tests.tiny_gguf import write_llama

    monkeypatch.setenv("EDGESPEC_STATE", str(tmp_path))
    target = write_llama(tmp_path / "t.gguf", seed=1, chat_template="{{ messages[0]['content'] }}")
    draft = write_llama(tmp_path / "d.gguf", seed=1)  # the target's very weights: drafts are accepted
    options = EngineOptions.of(model=str(target), draft=str(draft), tree_budget=4, draft_length=2, n_ctx=256,
                               n_threads=1, plan=False, history=False)
    with Engine.load(options) as engine:
        bench = benchmark.Bench(engine)
        trees = []
        forward_tree = engine.target.forward_tree
        monkeypatch.setattr(engine.target, "forward_tree", lambda *a: trees.append(len(a[1])) or forward_tree(*a))
        try:
            row = bench.measure("t", "1 2 3 4 5 6 7 8", 0.0, 12, 1)
        finally:
            bench.close()
    assert trees and max(trees) <= 4 and row["drafted"] > 0
    assert engine.runtime.decoding.tree_budget == 4


@pytest.mark.real
def test_end_to_end_rows_time_whole_processes_abab(tmp_path):
    """--e2e: whole `edgespec generate` processes, the options the bench ran with and --plain,
    their medians per prompt and category next to the decode rates (the old fields stay)."""
    smol = "smollm2-135m-instruct-q4_1"
    r = edgespec("bench", smol, "-c", "512", "--categories", "writing", "--per-category", "1", "-n", "8",
                 "--e2e", "--e2e-reps", "2", "--json")
    assert r.returncode == 0, r.stderr
    (record,) = json.loads(r.stdout)
    assert record["plain_tps"] > 0 and record["ratio"] > 0  # the decode rows as before
    e2e = record["end_to_end"]
    assert e2e["plain_seconds"] > 0 and e2e["edgespec_seconds"] > 0 and e2e["ratio"] > 0
    (sample,) = e2e["samples"]
    assert len(sample["seconds"]["plain"]) == len(sample["seconds"]["edgespec"]) == 2
    assert all(s > 1 for s in sample["seconds"]["plain"])  # a whole process: start-up included
    lo, hi = sample["ratio_spread"]
    assert 0 < lo <= hi


@pytest.mark.parametrize("argv", [[], ["-m", "x.gguf", "-md", "d.gguf", "-c", "512", "-t", "1", "--tree-budget", "8"],
                                  ["--ngram", "--mem-budget", "1073741824", "--schedule", "sequential"],
                                  ["--plain", "--no-ngram", "--rpc", "127.0.0.1:5,127.0.0.1:6", "-ngl", "3"]])
def test_the_flags_of_options_ask_for_the_same_options(argv, monkeypatch):
    """What `edgespec bench --e2e` hands its whole processes: the options it measured in one."""
    from typer.testing import CliRunner

    import edge_spec.surfaces.cli.bench as bench_cli
    from edge_spec.surfaces.cli import app, common

    seen = []
    monkeypatch.setattr(bench_cli, "run_bench", lambda options, *a, **k: seen.append(options))
    for args in (argv, None):
        result = CliRunner().invoke(app, ["bench", *(args if args is not None else common.cli_flags(seen[0]))])
        assert result.exit_code == 0, result.output
    assert seen[1] == seen[0]
