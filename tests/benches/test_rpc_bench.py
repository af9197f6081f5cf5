"""bench/rpc.py without models: its options, and the table pooled per latency with each ratio set
against the ratio at the lowest latency (the comparison issue 17's bench is for)."""

from __future__ import annotations

import pytest

from bench import rpc
from edge_spec.surfaces.benchmark import QUICK


def test_options_defaults_quick_and_errors(capsys):
    args = rpc.parse_args([])
    assert args.latency == (0.0, 1.0, 5.0) and args.workers == 1 and args.ngl == "half"
    assert args.settings.temperatures == (0.0, 0.8) and args.settings.per_category == 1
    quick = rpc.parse_args(["--quick", "--workers", "2", "--ngl", "plan", "--latency", "0,2.5"])
    assert quick.settings.categories == QUICK.categories and quick.settings.max_tokens == QUICK.max_tokens
    assert quick.settings.temperatures == (0.0,) and quick.workers == 2 and quick.ngl is None
    assert quick.latency == (0.0, 2.5)
    mine = rpc.parse_args(["--quick", "--temps", "0.7", "-n", "16", "--ngl", "12", "--categories", "coding,qa"])
    assert mine.settings.temperatures == (0.7,) and mine.settings.max_tokens == 16 and mine.ngl == 12
    assert mine.settings.categories == ("coding", "qa")
    for bad in (["--latency", "1,fast"], ["--temps", "-1"], ["--workers", "3"], ["--ngl", "most"], ["-n", "0"]):
        with pytest.raises(SystemExit):
            rpc.parse_args(bad)
    assert "--max-tokens must be at least 1" in capsys.readouterr().err


def row(latency, temp, prompt, plain_s, spec_s, tokens=100):
    return {"latency_ms": latency, "temperature": temp, "category": "coding", "prompt": prompt,
            "compared_tokens": [tokens], "plain_seconds": plain_s, "edgespec_seconds": spec_s,
            "drafted": 50, "accepted": 40, "ratio": round(plain_s / spec_s, 3)}


def test_ratios_are_pooled_per_latency_and_set_against_the_lowest():
    rows = [row(0, 0.0, "a", 10, 8), row(0, 0.8, "a", 10, 10),
            row(5, 0.0, "a", 20, 10), row(5, 0.8, "a", 20, 16)]
    table = rpc.pool(rows, (0.0, 5.0))
    cells = {(c["latency_ms"], c["group"]): c for c in table}
    assert set(cells) == {(0, "T=0"), (0, "T=0.8"), (0, "all"), (5, "T=0"), (5, "T=0.8"), (5, "all")}
    assert cells[0, "T=0"]["ratio"] == 1.25 and cells[5, "T=0"]["ratio"] == 2.0
    assert cells[5, "T=0"]["ratio_to_base"] == 1.6 and cells[0, "all"]["ratio_to_base"] == 1.0
    assert cells[5, "all"]["ratio"] == round(40 / 26, 3) and cells[0, "all"]["ratio"] == round(20 / 18, 3)
    assert cells[5, "all"]["plain_tps"] == 5.0  # 200 tokens in 40 s

    text = rpc.format_table(table)
    assert "| ratio / ratio at 0 ms |" in text
    assert "| 5 ms | 0 | 1 | 100 | 5.00 | 10.00 | **2.00x** | 1.60 | 0.80 |" in text.splitlines()
    (line,) = rpc.conclusions(table)
    assert line == "+5 ms: edgespec 1.54x plain, above its 1.11x at +0 ms (1.38 times it)"

    one_temp = rpc.pool([row(0, 0.0, "a", 10, 8), row(1, 0.0, "a", 10, 9)], (0.0, 1.0))
    assert [c["group"] for c in one_temp] == ["T=0", "T=0"]  # no "all" for a single temperature
    assert rpc.conclusions(one_temp) == ["+1 ms: edgespec 1.11x plain, not above its 1.25x at +0 ms (0.89 times it)"]


def test_the_command_to_reproduce_quotes_its_arguments():
    assert rpc.reproduce(["--latency", "0,1,5", "-m", "my model.gguf"]) == \
        ".venv/bin/python bench/rpc.py --latency 0,1,5 -m 'my model.gguf'"


def test_main_prints_the_table_the_verdicts_and_the_command(monkeypatch, capsys):
    import json

    def run_latency(args, delay, ngl, prompts):  # what the workers, proxies and engines would measure
        assert ngl == 14 and args.workers == 2 and len(prompts) == 1
        return [row(delay, 0.0, prompts[0].id, 10, 10 / (1.2 + delay / 10))], f"chains at {delay:g} ms"

    monkeypatch.setattr(rpc, "target_layers", lambda model: 28)
    monkeypatch.setattr(rpc, "run_latency", run_latency)
    argv = ["--workers", "2", "--categories", "coding", "--temps", "0", "--latency", "0,1,5"]
    rpc.main(argv)
    out = capsys.readouterr().out
    assert "14 of 28 layers on 2 rpc-server worker(s) per engine, 1 prompts, 128 tokens each" in out
    assert "edgespec at +5 ms: chains at 5 ms" in out
    assert "+1 ms: edgespec 1.30x plain, above its 1.20x at +0 ms (1.08 times it)" in out
    assert "+5 ms: edgespec 1.70x plain, above its 1.20x at +0 ms (1.42 times it)" in out
    assert out.rstrip().endswith("reproduce: .venv/bin/python bench/rpc.py " + " ".join(argv))

    rpc.main([*argv, "--json"])
    record = json.loads(capsys.readouterr().out)
    assert record["ngl"] == 14 and [c["ratio_to_base"] for c in record["table"]] == [1.0, 1.083, 1.417]
    assert "runs" not in record["rows"][0]
