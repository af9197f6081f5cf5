"""The `edgespec` command end to end, in a subprocess, on tiny generated models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.tiny_gguf import truncate_copy, write_llama, write_not_gguf

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("cli") / "tiny.gguf", seed=2, chat_template=TEMPLATE)


def edgespec(*args, stdin: str = "", env: dict | None = None, home=None) -> subprocess.CompletedProcess:
    environment = os.environ | {"NO_COLOR": "1"} | (env or {})
    if home is not None:
        environment["EDGESPEC_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "edge_spec.surfaces.cli", *args], input=stdin, text=True,
                          capture_output=True, env=environment, timeout=120)


def test_generate_streams_text_and_prints_json_stats(tiny):
    r = edgespec("generate", str(tiny), "-p", "hello world", "-n", "12", "--temp", "0", "--stats", "json", "-c", "128")
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    assert 1 <= stats["tokens"] <= 12
    assert stats["steps"] >= 1 and "acceptance_rate" in stats
    assert r.stdout.strip() != ""


def test_plain_and_greedy_generations_agree(tiny):
    common = ("generate", str(tiny), "-p", "the a and of", "-n", "16", "--temp", "0", "--stats", "none", "-c", "128")
    plain = edgespec(*common, "--plain")
    spec = edgespec(*common)
    assert plain.returncode == spec.returncode == 0
    assert plain.stdout == spec.stdout


def test_stop_string_cuts_the_reply(tiny):
    common = ("generate", str(tiny), "-p", "the a and of", "-n", "24", "--temp", "0", "--stats", "none", "-c", "128")
    full = edgespec(*common).stdout.rstrip("\n")
    assert len(full) > 6
    cut = edgespec(*common, "--stop", full[3:6]).stdout.rstrip("\n")
    assert cut == full[: full.index(full[3:6])]


def test_prompt_from_a_file_and_raw_mode(tiny, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("hello world hello world hello")
    r = edgespec("generate", str(tiny), "-f", str(prompt), "--raw", "-n", "8", "--temp", "0", "-c", "128")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stderr


def test_chat_reads_commands_and_messages_from_stdin(tiny):
    script = "/set temp 0\n/set bogus 1\nhello \\\nthere\n/stats\n/clear\n\"\"\"\nfirst line\nsecond\n\"\"\"\n/help\n/bye\n"
    r = edgespec("chat", str(tiny), "-n", "6", "-c", "256", stdin=script)
    assert r.returncode == 0, r.stderr
    assert "(temperature = 0.0)" in r.stderr
    assert "usage: /set NAME VALUE" in r.stderr
    assert "session:" in r.stderr            # /stats after a reply
    assert "(conversation cleared)" in r.stderr
    assert "/bye" in r.stderr                # /help text
    assert r.stderr.count("tok/s") >= 3      # two replies' stats lines and /stats


@pytest.mark.parametrize("make, args, message", [
    (lambda p: p / "missing.gguf", [], "no such model file"),
    (lambda p: write_not_gguf(p / "junk.gguf"), [], "not a GGUF file"),
    (None, ["--temp", "-1"], "--temp must be >= 0"),
    (None, ["--top-p", "0"], "--top-p must be in (0, 1]"),
    (None, ["--ngram", "--no-ngram"], "contradict"),
    (None, ["-c", "16", "-p", "hello " * 40], "raise -c/--ctx-size"),
])
def test_bad_input_is_one_line_and_nonzero(tiny, tmp_path, make, args, message):
    model = str(make(tmp_path)) if make else str(tiny)
    if "-p" not in args:
        args = [*args, "-p", "hi"]
    r = edgespec("generate", model, *args, "-n", "4")
    assert r.returncode == 1
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0  # one line


def test_truncated_model_and_missing_defaults(tiny, tmp_path):
    cut = truncate_copy(tiny, tmp_path / "cut.gguf", -2000)
    r = edgespec("generate", str(cut), "-p", "hi")
    # the planner's header check sees the truncation before llama.cpp does
    assert r.returncode == 1 and "truncated download" in r.stderr and "Traceback" not in r.stderr
    r = edgespec("generate", "-p", "hi", home=tmp_path / "empty-home")
    assert r.returncode == 1
    assert "edgespec models install" in r.stderr


def test_help_lists_the_conventional_flags():
    r = edgespec("generate", "--help", env={"COLUMNS": "200"})
    assert r.returncode == 0
    for flag in ("-md", "--draft", "-ngl", "-ngld", "--temp", "--top-k", "--top-p", "--min-p",
                 "--seed", "--plain", "--stats", "-f", "--system", "--ngram"):
        assert flag in r.stdout, flag


# --- hostile and broken models (issue 16) -----------------------------------------------------------
@pytest.mark.parametrize("template, said", [
    ("{{ 1/0 }}", "ZeroDivisionError"),
    ("{{ messages + 1 }}", "TypeError"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{% set x = 'x' * 2**31 %}{{ x|length }}", "memory budget"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
], ids=["division", "types", "recursion", "huge-string", "nested-ranges"])
def test_a_failing_chat_template_is_one_line_and_raw_prompts_still_work(tmp_path, template, said):
    model = write_llama(tmp_path / "bad-template.gguf", seed=2, chat_template=template)
    r = edgespec("generate", str(model), "-p", "hi", "-n", "4", "-c", "128")
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("edgespec: error:")]
    assert len(errors) == 1 and said in errors[0] and "chat template" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    raw = edgespec("generate", str(model), "-p", "hi", "--raw", "-n", "4", "--temp", "0", "-c", "128")
    assert raw.returncode == 0 and "Traceback" not in raw.stderr, raw.stderr


def test_tiny_temperatures_decode_without_an_error(tiny):
    common = ("generate", str(tiny), "-p", "the a and of", "-n", "12", "--stats", "none", "-c", "128")
    greedy = edgespec(*common, "--temp", "0")
    for temp in ("1e-310", "5e-324"):
        r = edgespec(*common, "--temp", temp, "--seed", "1")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert r.stdout == greedy.stdout  # the limit of tempering: greedy (random weights: no ties)


@pytest.mark.parametrize("temp", ["0", "0.8"])
def test_corrupt_weights_are_a_clear_error_naming_the_model(tmp_path, temp):
    model = write_llama(tmp_path / "corrupt.gguf", seed=2, chat_template=TEMPLATE, name="corrupt-tiny")
    data = bytearray(model.read_bytes())
    n = len(data) // 3
    data[-n:] = b"\xff" * n  # tensor data (at the end): every float a NaN
    model.write_bytes(bytes(data))
    r = edgespec("generate", str(model), "-p", "hi", "-n", "4", "--temp", temp, "-c", "128", "--plain")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "corrupt-tiny computed non-finite logits" in r.stderr and "Traceback" not in r.stderr, r.stderr
