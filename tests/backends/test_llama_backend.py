"""The llama.cpp backend on tiny generated GGUF models: evaluation, rollback, facts, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions
from edge_spec.backends.vocab import check_compatible
from edge_spec.core.drafters import ModelDrafter, NgramDrafter
from edge_spec.core.runtime import Runtime
from edge_spec.core.tree import TokenTree
from edge_spec.options import EngineOptions
from edge_spec.pipeline.engine import Engine
from edge_spec.types import EdgespecError, SamplingParams
from tests.tiny_gguf import truncate_copy, write_llama, write_not_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("m") / "tiny.gguf", seed=1, chat_template="{{ messages[0]['content'] }}")


@pytest.fixture(scope="module")
def backend(tiny):
    b = LlamaCppBackend(tiny, LlamaOptions(n_ctx=64, n_threads=1, n_batch=16))
    yield b
    b.close()


def test_forward_returns_one_row_per_position(backend):
    backend.truncate(0)
    all_rows = backend.forward([1, 10, 11, 12])
    assert all_rows.shape == (4, backend.vocab_size)
    assert np.isfinite(all_rows).all()
    assert backend.tokens == [1, 10, 11, 12]
    backend.truncate(0)
    last = backend.forward([1, 10, 11, 12], logits="last")
    assert last.shape == (1, backend.vocab_size)
    np.testing.assert_allclose(last[0], all_rows[-1], atol=1e-4)
    assert backend.forward([13], logits="none").shape == (0, backend.vocab_size)


def test_rollback_is_exact(backend):
    backend.truncate(0)
    backend.forward([1, 20, 21])
    fresh = backend.forward([22, 23, 24])
    backend.truncate(3)
    backend.forward([40, 41])  # a rejected continuation
    backend.truncate(3)
    again = backend.forward([22, 23, 24])
    np.testing.assert_array_equal(again, fresh)
    assert backend.n_past == 6


def test_chunks_longer_than_the_batch(backend):
    backend.truncate(0)
    tokens = [1] + list(range(30, 60))  # 31 tokens, n_batch 16
    chunked = backend.forward(tokens)
    assert chunked.shape == (31, backend.vocab_size)
    backend.truncate(0)
    last = backend.forward(tokens, logits="last")
    np.testing.assert_allclose(last[0], chunked[-1], atol=1e-4)


def test_never_writes_past_the_context(backend):
    backend.truncate(0)
    n = backend.n_ctx - 4
    backend.forward([5 + i % 250 for i in range(n)], logits="none")
    with pytest.raises(EdgespecError, match="context full"):
        backend.forward([5, 6, 7, 8, 9])
    assert backend.n_past == n


def test_facts_are_read_from_the_file(backend, tiny):
    f = backend.facts
    assert f.architecture == "llama"
    assert f.vocab_size == 320 and f.n_layers == 2 and f.n_embd == 64
    assert f.bos == 1 and f.eos == 2
    assert f.file_size == tiny.stat().st_size
    assert f.n_params > 0
    assert f.chat_template == "{{ messages[0]['content'] }}"


def test_tokenize_and_pieces_round_trip(backend):
    tokens = backend.tokenize("hello world", add_special=False, parse_special=False)
    assert backend.detokenize(tokens).strip() == "hello world"
    assert backend.is_eog(2) and not backend.is_eog(10)


def test_runtime_on_a_real_backend_stops_at_the_context_limit(tiny):
    with LlamaCppBackend(tiny, LlamaOptions(n_ctx=24, n_threads=1)) as target, \
         LlamaCppBackend(tiny, LlamaOptions(n_ctx=24, n_threads=1)) as draft:
        rt = Runtime(target, [NgramDrafter(), ModelDrafter(draft)])
        steps = list(rt.generate([1, 10, 11, 12], SamplingParams(temperature=0, max_tokens=100)))
        assert steps[-1].finish_reason in ("context", "stop")
        assert target.n_past <= 24
        if steps[-1].finish_reason == "context":
            assert target.n_past == 24


def test_self_drafting_tiny_model_accepts_every_greedy_draft(tiny):
    with LlamaCppBackend(tiny, LlamaOptions(n_ctx=128, n_threads=1)) as target, \
         LlamaCppBackend(tiny, LlamaOptions(n_ctx=128, n_threads=1)) as draft:
        rt = Runtime(target, [ModelDrafter(draft)], AlwaysDraft(3))
        steps = list(rt.generate([1, 10, 11, 12], SamplingParams(temperature=0, max_tokens=40)))
        stats = steps[-1].stats
        assert stats.n_drafted > 20
        assert stats.acceptance_rate == 1.0


class AlwaysDraft:
    """A controller that always drafts k tokens (for tests that must exercise drafting)."""

    def __init__(self, k):
        self.k = k
        self.plain_step_seconds = None

    def could_pay(self, source):
        return True

    def draft_length(self, source, cap, behind=0):
        return min(self.k, cap)

    def extension(self, lead, n, source, cap, behind=0):  # the draft model continues every n-gram draft
        return min(self.k, cap)

    def observe_verify(self, n, seconds):
        pass

    def observe_draft(self, *args):
        pass

    def acceptance(self, source):
        return 0.0

    def tree_costs(self, drafter, budget, max_depth):
        return None  # trees grown to their budget, paying or not


# --- bad input -------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(EdgespecError, match="no such model file"):
        LlamaCppBackend(tmp_path / "missing.gguf")


def test_not_gguf(tmp_path):
    with pytest.raises(EdgespecError, match="not a GGUF file"):
        LlamaCppBackend(write_not_gguf(tmp_path / "x.gguf"))


def test_truncated_file(tmp_path, tiny):
    bad = truncate_copy(tiny, tmp_path / "cut.gguf", -1000)
    with pytest.raises(EdgespecError, match="lies outside the file.*truncated download"):  # before llama.cpp sees it
        LlamaCppBackend(bad, LlamaOptions(n_ctx=32, n_threads=1))


@pytest.mark.parametrize("kwargs, message", [
    ({"token_prefix": "x"}, "token 5 is"),
    ({"eos": 3}, "BOS/EOS"),
    ({"vocab_size": 600}, "vocabulary sizes"),
])
def test_incompatible_drafters_are_refused(tmp_path, backend, kwargs, message):
    other = write_llama(tmp_path / "other.gguf", **kwargs)
    with LlamaCppBackend(other, LlamaOptions(n_ctx=32, n_threads=1)) as d:
        with pytest.raises(EdgespecError, match=message):
            check_compatible(backend, d)


def test_compatible_drafter_within_size_slack(tmp_path, backend):
    close = write_llama(tmp_path / "close.gguf", vocab_size=400, n_pieces=59, seed=3)
    with LlamaCppBackend(close, LlamaOptions(n_ctx=32, n_threads=1)) as d:
        check_compatible(backend, d)  # 320 vs 400 tokens, same strings: accepted


def test_engine_refuses_incompatible_drafter_and_prompt_too_long(tmp_path, tiny):
    other = write_llama(tmp_path / "other.gguf", token_prefix="y")
    with pytest.raises(EdgespecError, match="cannot draft for target"):
        Engine.load(EngineOptions.of(model=str(tiny), draft=str(other), n_ctx=32, n_threads=1))
    with Engine.load(EngineOptions.of(model=str(tiny), n_ctx=16, n_threads=1, calibrate=False)) as engine:
        with pytest.raises(EdgespecError, match="raise -c/--ctx-size"):
            list(engine.stream(list(range(5, 30)), SamplingParams(temperature=0)))
        assert engine.chat_tokens([{"role": "user", "content": "hello"}])


def test_calibration_measures_the_sizes_and_caches_them(tiny, tmp_path, monkeypatch):
    from edge_spec.plan import calibrate

    monkeypatch.setenv("EDGESPEC_STATE", str(tmp_path))
    with LlamaCppBackend(tiny, LlamaOptions(n_ctx=128, n_threads=1)) as b:
        costs = calibrate.verify_costs(b, 9)
        assert sorted(costs) == [1, 2, 3, 4, 5, 6, 8, 9]
        assert all(t > 0 for t in costs.values())
        assert b.n_past == 0  # the cache is left empty
        assert calibrate.calibration_file(b).is_relative_to(tmp_path)

        def no_measuring(*args, **kwargs):
            raise AssertionError("measured again instead of reading the cache")

        monkeypatch.setattr(calibrate, "measure", no_measuring)
        assert calibrate.verify_costs(b, 9) == costs


def test_gpu_load_failure_falls_back_to_the_cpu_and_says_so(tiny, monkeypatch):
    """A GPU that disappeared or a driver error: the model runs on the CPU, stated in the notes."""
    import edge_spec.backends.llama_cpp as llama_backend
    import edge_spec.backends.load as load_module

    real = llama_backend.LlamaCppBackend

    class NoGpu(real):
        def __init__(self, path, options=LlamaOptions(), progress=None, **kw):
            if options.n_gpu_layers:
                raise EdgespecError("llama.cpp could not load: CUDA error: no CUDA-capable device is detected")
            super().__init__(path, options, progress, **kw)

    monkeypatch.setattr(load_module, "LlamaCppBackend", NoGpu)  # where the loader finds it
    with Engine.load(EngineOptions.of(model=str(tiny), n_ctx=64, n_threads=1, n_gpu_layers=99, history=False)) as engine:
        assert engine.target.options.n_gpu_layers == 0
        assert any("99 GPU layers" in n and "CUDA error" in n and "on the CPU" in n for n in engine.notes)
        assert list(engine.stream(engine.text_tokens("hello"), SamplingParams(temperature=0, max_tokens=3)))


def test_a_calibration_learns_from_each_session_and_is_never_dropped(tiny, tmp_path, monkeypatch):
    """A calibration taken while the machine was busy (here: the cached curve made 10x slower) is
    pulled toward what a session's passes really cost, part of the way per session, and kept: no
    load measures again."""
    import json

    from edge_spec.plan import calibrate

    monkeypatch.setenv("EDGESPEC_STATE", str(tmp_path))
    options = EngineOptions.of(model=str(tiny), n_ctx=256, n_threads=1, history=False)
    with Engine.load(options) as engine:
        cache = calibrate.calibration_file(engine.target)
    data = json.loads(cache.read_text())
    slow = {n: s * 10 for n, s in data["seconds"].items()}
    cache.write_text(json.dumps(data | {"seconds": slow}))
    monkeypatch.setattr(calibrate, "measure", lambda *a, **k: pytest.fail("a load measured again"))
    steps_before = None
    for _ in range(2):
        with Engine.load(options) as engine:
            assert engine.runtime.controller.step_seconds == pytest.approx(
                json.loads(cache.read_text())["seconds"]["1"])  # seeded from the cache as it is
            steps = list(engine.stream(engine.text_tokens("hello"), SamplingParams(temperature=0, max_tokens=60)))
            assert engine.runtime.controller.plain_steps[0] >= calibrate.MIN_PASSES, steps[-1].stats
        step = json.loads(cache.read_text())["seconds"]["1"]
        assert cache.exists() and step < (steps_before or slow["1"])  # kept, and moved toward the truth
        steps_before = step


def test_a_session_of_the_parallel_schedule_teaches_the_calibration_nothing(tiny, tmp_path, monkeypatch):
    """Its passes ran beside a drafting thread: the cached curve stays as it was."""
    from edge_spec.plan import calibrate

    monkeypatch.setenv("EDGESPEC_STATE", str(tmp_path))
    options = dict(model=str(tiny), n_ctx=256, n_threads=1, history=False)
    with Engine.load(EngineOptions.of(**options)) as engine:
        cache = calibrate.calibration_file(engine.target)
    before = cache.read_text()
    with Engine.load(EngineOptions.of(**options, draft=str(tiny), schedule="parallel")) as engine:
        assert engine.runtime.decoding.schedule == "parallel"
        list(engine.stream(engine.text_tokens("hello"), SamplingParams(temperature=0, max_tokens=60)))
        assert max(count for count, _ in engine.runtime.controller.observed.values()) >= calibrate.MIN_PASSES
    assert cache.read_text() == before


def test_tree_pass_equals_each_path_evaluated_alone_and_keeps_one_branch(tiny, backend):
    """forward_tree: every node sees the context and its ancestors only (llama.cpp sequence sets
    over a unified KV cache); keep_path leaves the cache as if the kept path had been decoded."""
    prompt, pending = [5, 9, 14, 7], 11
    tokens, parents = [20, 21, 22, 23, 24, 25], [-1, -1, 0, 0, 1, 4]

    def reference(seq):
        backend.truncate(0)
        return backend.forward(seq, logits="last")[0]

    with LlamaCppBackend(tiny, LlamaOptions(n_ctx=64, n_threads=1, n_batch=16, n_seq_max=8)) as tree:
        for path, then in (([1, 4, 5], 30), ([0, 3], 31), ([], 32)):
            tree.truncate(0)
            tree.forward(prompt, logits="none")
            logits = tree.forward_tree(pending, TokenTree(tuple(tokens), tuple(parents)))
            assert logits.shape == (1 + len(tokens), tree.vocab_size)
            np.testing.assert_allclose(logits[0], reference(prompt + [pending]), atol=1e-3)
            for i in range(len(tokens)):
                node, branch = i, []
                while node >= 0:
                    branch.insert(0, tokens[node])
                    node = parents[node]
                np.testing.assert_allclose(logits[1 + i], reference(prompt + [pending] + branch), atol=1e-3)
            tree.keep_path(path)
            kept = prompt + [pending] + [tokens[i] for i in path]
            assert tree.tokens == kept
            after = tree.forward([then], logits="last")[0]
            # the kept cells sit among freed ones, so attention sums in another order: 1e-2
            np.testing.assert_allclose(after, reference(kept + [then]), atol=1e-2)
            wrong = kept[:-1] + [kept[-1] + 1] if path else kept + [tokens[0]]
            assert np.abs(after - reference(wrong + [then])).max() > 0.1  # a wrong cache would show
        with pytest.raises(EdgespecError, match="n_seq_max"):
            tree.forward_tree(pending, TokenTree(tuple(range(20, 28)), (-1,) * 8))


def test_a_load_reads_each_model_header_once(tiny, tmp_path, monkeypatch):
    """The engine opens each model file once (edge_spec.models.modelfile) and passes it down: planning,
    the drafter's provenance and llama.cpp's pre-load validation do not parse the header again."""
    import os
    import shutil
    import sys

    from edge_spec.backends import llama_cpp
    from edge_spec.models import gguf_file, modelfile, shape

    draft = tmp_path / "draft.gguf"
    shutil.copy(tiny, draft)
    shape._shape_cached.cache_clear()
    modelfile._cached.cache_clear()  # nothing read by earlier tests
    monkeypatch.setenv("EDGESPEC_STATE", str(tmp_path))  # nor kept across processes
    reads: list[str] = []
    real = gguf_file.read_header

    def counting(path):
        reads.append(os.path.realpath(path))
        return real(path)

    readers = (gguf_file.read_header, gguf_file.validate)
    for module in [m for n, m in sys.modules.items() if n.startswith("edge_spec.")]:  # wherever they are bound
        for name in ("read_header", "validate"):
            if getattr(module, name, None) in readers:
                monkeypatch.setattr(module, name, counting)
    assert llama_cpp.validate is counting and shape.read_header is counting
    with Engine.load(EngineOptions.of(model=str(tiny), draft=str(draft), n_ctx=64, n_threads=1, history=False)) as engine:
        assert engine.draft_backend is not None or any("does not pay" in n for n in engine.notes)
    assert reads.count(os.path.realpath(tiny)) == 1, reads
    assert reads.count(os.path.realpath(draft)) == 1, reads


def test_a_batch_smaller_than_the_sequences_does_not_abort(tiny):
    """llama.cpp reserves an output row per sequence and aborts the process unless they fit in a
    batch (GGML_ASSERT n_outputs_max): a drafter next to a paged target has a batch of 64, and
    trees of 64 nodes need 65 sequences. The context takes the larger of the two."""
    with LlamaCppBackend(tiny, LlamaOptions(n_ctx=256, n_batch=8, n_seq_max=17)) as small:
        assert small.forward([1, 2, 3], logits="last").shape == (1, small.vocab_size)
