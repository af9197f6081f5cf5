"""`edgespec drafter build --method trim` (VocabTrim) on the real SmolLM2-135M: a valid GGUF with a
K-token head, chosen K, provenance; as a drafter its greedy output is the target's, its sampled
output passes a chi-square test against the target's distribution though the target often emits
tokens the drafter cannot propose, and bad input gets clear errors."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from scipy.stats import chisquare
from typer.testing import CliRunner

from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions
from edge_spec.backends.trimmed import TrimmedBackend, as_drafter_of
from edge_spec.build.quant import build
from edge_spec.build.trim import MIN_K, choose_k, read_vocab, write_trimmed
from edge_spec.build.trim import kept_ids as choose_ids
from edge_spec.core.drafters import ModelDrafter
from edge_spec.core.runtime import Runtime
from edge_spec.core.sampling import probs
from edge_spec.models import registry as models
from edge_spec.models.chat_template import chat_tokens
from edge_spec.models.gguf_file import validate
from edge_spec.models.provenance import info, kept_ids
from edge_spec.models.shape import model_shape
from edge_spec.options import EngineOptions
from edge_spec.pipeline.engine import Engine
from edge_spec.plan.choose import drafter_candidates
from edge_spec.plan.costmodel import trimmed_shape
from edge_spec.surfaces.cli import app
from edge_spec.types import EdgespecError, SamplingParams
from tests.backends.test_llama_backend import AlwaysDraft

pytestmark = pytest.mark.real
SMOL = "smollm2-135m-instruct-q4_1"


@pytest.fixture(scope="module")
def trimmed(smol_path, tmp_path_factory):
    """Built the way a user would: K chosen by the build, counted with the model itself."""
    return build(smol_path, method="trim", out=tmp_path_factory.mktemp("trim") / "smol.trim.gguf")


def test_trimmed_file_is_valid_with_provenance_and_a_k_row_head(smol_path, trimmed):
    meta = info(trimmed)
    vocab = read_vocab(smol_path)
    k = meta["keep"]
    assert meta["method"] == "vocabtrim" and meta["counted_with"] == smol_path.name
    assert "chosen" in meta["k_choice"] and f"K={k}:" in meta["k_choice"]
    assert MIN_K <= k < vocab.size
    header = validate(trimmed)
    shapes = {t.name: t.shape for t in header.tensors}
    assert shapes["token_embd.weight"] == (576, k)  # SmolLM2 ties its head to the embeddings
    ids = kept_ids(trimmed)
    assert len(ids) == k and np.all(np.diff(ids) > 0)
    assert set(vocab.forced()) <= set(ids.tolist())  # bytes and the chat template's special tokens
    assert kept_ids(smol_path) is None
    assert trimmed.stat().st_size < smol_path.stat().st_size


def test_trimmed_drafter_rows_are_the_targets_tokens(smol_path, trimmed):
    with LlamaCppBackend(smol_path, LlamaOptions(n_ctx=256, n_threads=1)) as t, \
            LlamaCppBackend(trimmed, LlamaOptions(n_ctx=256, n_threads=1)) as d:
        wrapped = as_drafter_of(t, trimmed, d)  # checks every kept row against the target's string
        assert isinstance(wrapped, TrimmedBackend)
        text = "Zanzibar's quixotic xylophonists, naïvely: 你好!"
        ids = t.tokenize(text, add_special=False, parse_special=False)
        rows = wrapped.forward(ids, logits="all")
        assert rows.shape == (len(ids), d.vocab_size)
        assert wrapped.reencoded > 0  # rare tokens were spelled with kept ones
        assert d.detokenize(d.tokens) == text  # ...and the drafter saw exactly the same text
        wrapped.truncate(3)
        assert d.detokenize(d.tokens) == t.detokenize(ids[:3])
        with pytest.raises(EdgespecError, match="cannot draft"):
            as_drafter_of(d, smol_path, t)  # the untrimmed model is no trimmed drafter's target


def greedy_runs(model, draft, prompt: str, max_tokens: int, draft_length: int | None, **spec_options):
    """(plain greedy tokens, the Steps of greedy speculation with `draft`), both through the
    engine on `model` with nothing else drafting (but what `spec_options` turn on)."""
    opts = dict(model=str(model), n_ctx=512, plan=False, calibrate=False, ngram=False, history=False)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    messages = [{"role": "user", "content": prompt}]
    with Engine.load(EngineOptions.of(**opts, plain=True)) as plain:
        want = [t for s in plain.stream(plain.chat_tokens(messages), sp) for t in s.tokens]
    with Engine.load(EngineOptions.of(**{**opts, **spec_options}, draft=str(draft), draft_length=draft_length)) as spec:
        steps = list(spec.stream(spec.chat_tokens(messages), sp))
    return want, steps


def test_trimmed_drafter_greedy_equals_plain_greedy(smol_path, trimmed):
    want, steps = greedy_runs(smol_path, trimmed, "Write a haiku about rivers.", 48, 4)
    assert [t for s in steps for t in s.tokens] == want
    assert steps[-1].stats.n_accepted > 0


def test_a_trimmed_drafter_grows_token_trees_in_the_targets_ids(smol_path, tmp_path):
    """Trees grown in the drafter's cache (extend_tree) must see drafter ids, not the target's: a
    1,024-token drafter, a prompt of tokens it does not keep, n-gram seeds from that prompt. Before,
    the target's ids reached llama_decode raw, it refused them, and the drafter was dropped."""
    prompt = "Repeat exactly: Photosynthesis converts sunlight, water and carbon dioxide into glucose. " * 2
    vocab, counts = read_vocab(smol_path), np.zeros(read_vocab(smol_path).size)
    with LlamaCppBackend(smol_path, LlamaOptions(n_ctx=256)) as t:
        counts[t.tokenize(prompt, add_special=False)] = 1.0  # kept, so that the drafter can repeat it
    kept = choose_ids(counts, vocab, MIN_K)
    assert any(d != t for d, t in enumerate(kept))  # drafter ids are not the target's
    small = tmp_path / "smol.trim-1024.gguf"
    write_trimmed(smol_path, small, kept, {"edgespec.drafter.kept_ids": kept})
    want, steps = greedy_runs(smol_path, small, prompt, 40, None, tree_budget=16, ngram=True)
    assert [t for s in steps for t in s.tokens] == want
    stats = steps[-1].stats
    assert not stats.notes, stats.notes   # no drafter dropped mid-reply
    model = {s: (d, a) for s, d, a, _ in stats.by_source}.get("model", (0, 0))
    assert model[0] > 0 and model[1] > 0


def test_sampling_with_a_small_trimmed_drafter_keeps_the_target_distribution(smol_path, tmp_path):
    """Chi-square on the first sampled token with a 1,024-token drafter: the target's likely first
    tokens include ones the drafter cannot propose, which only the residual can produce."""
    vocab = read_vocab(smol_path)
    kept = choose_ids(np.zeros(vocab.size), vocab, MIN_K)
    small = tmp_path / "smol.trim-1024.gguf"
    write_trimmed(smol_path, small, kept, {"edgespec.drafter.kept_ids": kept})
    sp = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=2)
    with LlamaCppBackend(smol_path, LlamaOptions(n_ctx=256)) as t, LlamaCppBackend(small, LlamaOptions(n_ctx=256)) as d:
        prompt = chat_tokens(t, [{"role": "user", "content": "Name one animal. Answer with one word."}])
        p = probs(t.forward(prompt, logits="last")[0], sp)
        t.truncate(0)
        outside = p[np.setdiff1d(np.arange(len(p)), kept)].sum()
        assert outside > 0.2  # the test means something only if out-of-set tokens are likely
        rt = Runtime(t, [ModelDrafter(as_drafter_of(t, small, d))], AlwaysDraft(2))
        n, counts, drafted, accepted = 1200, Counter(), 0, 0
        for seed in range(n):
            steps = list(rt.generate(prompt, sp.with_(seed=seed)))
            counts[steps[0].tokens[0]] += 1
            drafted += steps[-1].stats.n_drafted
            accepted += steps[-1].stats.n_accepted
    assert 0 < accepted < drafted
    assert sum(c for tok, c in counts.items() if tok not in set(kept.tolist())) > 0.1 * n
    frequent = [tok for tok in np.argsort(-p) if p[tok] * n >= 5]
    observed = [counts[tok] for tok in frequent] + [n - sum(counts[tok] for tok in frequent)]
    expected = [p[tok] * n for tok in frequent] + [n - sum(p[tok] * n for tok in frequent)]
    assert len(frequent) >= 3
    assert chisquare(observed, expected).pvalue > 1e-3


def test_planner_weighs_a_trimmed_drafter_built_for_the_target(smol_path, trimmed, monkeypatch, tmp_path):
    from edge_spec.plan import choose

    monkeypatch.setattr(choose, "default_output", lambda source, method="quant", bits="q4_0": trimmed.parent / "x.gguf")
    assert trimmed in drafter_candidates(smol_path)
    other = tmp_path / "other.gguf"  # same weights, another file name: not the target it was counted with
    other.symlink_to(smol_path)
    assert trimmed not in drafter_candidates(other)


def test_bad_input_gets_clear_errors(smol_path, tmp_path):
    with pytest.raises(EdgespecError, match="too small"):
        build(smol_path, method="trim", keep=300, out=tmp_path / "a.gguf")
    with pytest.raises(EdgespecError, match="not smaller than the vocabulary"):
        build(smol_path, method="trim", keep=10**6, out=tmp_path / "a.gguf")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(EdgespecError, match="is empty"):
        build(smol_path, method="trim", keep=4096, calibration=empty, out=tmp_path / "a.gguf")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(EdgespecError, match="not UTF-8 text"):
        build(smol_path, method="trim", keep=4096, calibration=binary, out=tmp_path / "a.gguf")
    gemma = models.installed_path("gemma-3-270m-q4_k_m")
    if gemma is not None:  # another family's vocabulary cannot count for this one
        with pytest.raises(EdgespecError, match="different vocabularies"):
            build(smol_path, method="trim", keep=4096, target=gemma, out=tmp_path / "a.gguf")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written left behind


def test_cli_builds_and_reports_the_choice(smol_path, tmp_path):
    out = tmp_path / "cli.trim.gguf"
    calib = tmp_path / "mine.txt"
    calib.write_text("def add(a, b):\n    return a + b\n\nThe quick brown fox jumps over the lazy dog.\n")
    result = CliRunner().invoke(app, ["drafter", "build", str(smol_path), "--method", "trim", "--keep", "4096",
                                      "--calibration", str(calib), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "K=4096: held-out coverage" in result.output
    shown = CliRunner().invoke(app, ["drafter", "info", str(out)])
    assert "vocabtrim" in shown.output and "mine.txt" in shown.output


def test_trim_with_bits_requantizes_the_blocks_keeps_the_head_at_8_bits_and_stays_exact(smol_path, trimmed, tmp_path):
    k = info(trimmed)["keep"]
    both = build(smol_path, method="trim", keep=k, bits="q4_0", out=tmp_path / "smol.trim-q4_0.gguf")
    meta = info(both)
    assert meta["quantization"] == "q4_0, head q8_0" and meta["keep"] == k
    assert np.array_equal(kept_ids(both), kept_ids(trimmed))  # same counts (cached), same tokens
    types = {t.name: t.type for t in validate(both).tensors}
    assert types["token_embd.weight"] == 8  # Q8_0: SmolLM2's head is its embedding table
    assert {types[n] for n in types if n.startswith("blk.") and n.endswith("ffn_down.weight")} == {2}  # Q4_0
    assert both.stat().st_size < trimmed.stat().st_size
    assert not list(tmp_path.glob("*.trim")) and not list(tmp_path.glob("*.partial"))
    # the counts of every reply are remembered (one file per target), for the next build
    assert len(list((models.state_dir() / "counts").glob(f"{smol_path.stem}-*.npz"))) == 1
    want, steps = greedy_runs(smol_path, both, "Name three rivers in Europe.", 40, 3)
    assert [t for s in steps for t in s.tokens] == want and steps[-1].stats.n_accepted > 0


def test_plan_suggests_building_a_trimmed_drafter_only_when_it_is_predicted_to_pay(monkeypatch, tmp_path):
    from edge_spec.pipeline.resolve import model_paths
    from edge_spec.plan.choose import plan_for
    from edge_spec.plan.history import History
    from edge_spec.types import Stats

    monkeypatch.setenv("EDGESPEC_STATE", str(tmp_path))  # the history written here stays here
    target, drafter = model_paths(EngineOptions())  # the default pair
    notes: list[str] = []
    plan_for(EngineOptions.of(profile="ci-2core", history=False), target, drafter, notes)
    assert not any("trimmed 4-bit copy" in n for n in notes)  # at the prior acceptance n-gram drafting wins
    history = History()  # this pair measured at 96% acceptance: a cheaper drafter step pays
    history.record(target, drafter, Stats(by_source=(("model", 1000, 960, 10),)), ngram_only=False)
    history.save()
    notes = []
    plan_for(EngineOptions.of(profile="ci-2core"), target, drafter, notes)
    hint = [n for n in notes if "trimmed 4-bit copy" in n]
    assert len(hint) == 1 and f"drafter build {drafter} --method trim --target {target} --bits q4_0" in hint[0]


def test_the_planned_shape_of_a_trim_is_the_built_files(smol_path, trimmed):
    """The planner's shape of a trim not built yet (costmodel.trimmed_shape) has the file size
    the build gives: a drafter next to a paged target is loaded whole, so its size is its memory."""
    keep = info(trimmed)["keep"]
    planned = trimmed_shape(model_shape(smol_path), keep)
    assert planned.vocab_size == keep
    assert planned.file_bytes == pytest.approx(trimmed.stat().st_size, rel=0.1)
    assert planned.file_bytes < model_shape(smol_path).file_bytes


def test_k_is_chosen_within_a_memory_budget_or_refused_in_one_line(smol_path):
    """`--mem-budget` plans each K within it; a budget no copy drafts in is one line naming it."""
    vocab = read_vocab(smol_path)
    counts = [np.random.default_rng(i).random(vocab.size) for i in range(4)]
    with pytest.raises(EdgespecError, match=r"no trimmed copy of .* within 0\.00 GiB"):
        choose_k(counts, vocab, smol_path, smol_path, memory_budget=1 << 20)
    keep, lines = choose_k(counts, vocab, smol_path, smol_path, memory_budget=8 << 30)
    assert MIN_K <= keep <= vocab.size and any("(chosen)" in line for line in lines)
