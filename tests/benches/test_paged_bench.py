"""bench/paged.py without models or cgroups: the summary's medians, ranges and ratios to `--plain`,
end to end next to decode, and rows for runs killed for memory (issue 25, item 5)."""

from __future__ import annotations

from bench import paged


def row(config, tok_s, e2e, prompt="code", rep=0, temp=0.0, predicted=None, text="x"):
    return {"config": config, "tokens_per_second": tok_s, "end_to_end_seconds": e2e, "tokens": 64,
            "tokens_per_pass": 4.0, "temperature": temp, "prompt": prompt, "rep": rep, "text": text,
            "predicted_tokens_per_second": predicted, "limit_bytes": 2 << 30}


def test_the_summary_gives_medians_ranges_and_ratios_to_plain(capsys):
    rows = [row("plain", 0.5, 140.0), row("plain", 0.7, 100.0, rep=1), row("plain", 0.6, 120.0, rep=2),
            row("paged", 3.0, 30.0, predicted=2.0), row("paged", 4.0, 20.0, rep=1, predicted=2.2),
            row("paged", 5.0, 25.0, rep=2, predicted=2.4, text="y"),
            {"config": "chains", "failed": "killed for memory: []", "prompt": "code", "temperature": 0.0}]
    paged.summarize(rows, 0.56, 2 << 30)
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("paged") and "runs" not in x)
    # median 4.00 tok/s (3.00-5.00), 4.00 / 0.60 = 6.67x; end to end median 25.0 s, 120 / 25 = 4.80x
    assert "4.00 ( 3.00- 5.00)" in line and "6.67x" in line and "25.0 (  20.0-  30.0)" in line and "4.80x" in line
    assert line.rstrip().endswith("2.20")  # the plan's prediction, next to what it measured
    assert "the same text as plain on 2 of 3 runs" in out
    assert "chains  code T=0: killed for memory" in out
    assert "code: plain 0.60 tok/s 120.0 s, paged 4.00 tok/s 25.0 s" in out  # per prompt, medians of the repeats
