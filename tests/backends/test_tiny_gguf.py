"""The tiny random GGUF models load and run in llama.cpp through the low-level API."""

from __future__ import annotations

import ctypes
import time

import gguf  # noqa: F401  (the writer's dependency: fail, never skip, when it is missing)
import llama_cpp
import numpy as np
import pytest

from tests import tiny_gguf
from tests.tiny_gguf import N_BYTES, N_FIXED, build_vocab, truncate_copy, write_llama, write_not_gguf

_BACKEND_READY = False


def _backend() -> None:
    global _BACKEND_READY
    if not _BACKEND_READY:
        llama_cpp.llama_backend_init()
        _BACKEND_READY = True


def _load_model(path, *, vocab_only: bool = False):
    _backend()
    mp = llama_cpp.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.vocab_only = vocab_only
    return llama_cpp.llama_model_load_from_file(str(path).encode(), mp)


def _new_context(model, n_ctx: int = 64, n_batch: int = 16):
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = n_batch
    cp.n_ubatch = n_batch
    cp.n_seq_max = 1
    cp.n_threads = 1
    cp.n_threads_batch = 1
    cp.no_perf = True
    return llama_cpp.llama_init_from_model(model, cp)


def _decode(ctx, batch, tokens, pos0, n_vocab):
    """Decode ``tokens`` at positions pos0.. in sequence 0, logits for every token."""
    batch.n_tokens = len(tokens)
    for i, t in enumerate(tokens):
        batch.token[i] = t
        batch.pos[i] = pos0 + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = 1
    rc = llama_cpp.llama_decode(ctx, batch)
    assert rc == 0, f"llama_decode returned {rc}"
    rows = []
    for i in range(len(tokens)):
        ptr = llama_cpp.llama_get_logits_ith(ctx, i)
        assert ptr
        rows.append(np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy())
    return np.stack(rows)


def _texts(vocab, ids):
    return [llama_cpp.llama_vocab_get_text(vocab, i) for i in ids]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return write_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf", seed=0)


def test_write_is_fast_and_small(tmp_path):
    write_llama(tmp_path / "warm.gguf")  # import gguf outside the timed region
    t0 = time.perf_counter()
    p = write_llama(tmp_path / "m.gguf", seed=3)
    dt = time.perf_counter() - t0
    assert dt < 1.0
    assert 50_000 < p.stat().st_size < 1_000_000
    # deterministic in the seed
    q = write_llama(tmp_path / "m2.gguf", seed=3)
    assert p.read_bytes() == q.read_bytes()
    r = write_llama(tmp_path / "m3.gguf", seed=4)
    assert p.read_bytes() != r.read_bytes()


def test_logits_finite_spread_and_seq_rm(tiny_path):
    model = _load_model(tiny_path)
    assert model, "llama.cpp failed to load the tiny model"
    ctx = _new_context(model)
    assert ctx
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    assert n_vocab == tiny_gguf.DEFAULT_VOCAB_SIZE
    batch = llama_cpp.llama_batch_init(16, 0, 1)
    try:
        toks = [1, 10, 20]
        logits = _decode(ctx, batch, toks, 0, n_vocab)
        assert logits.shape == (3, n_vocab)
        assert np.all(np.isfinite(logits))
        assert np.all(logits.std(axis=1) > 0.5)
        # the output layer separates tokens: the argmax is unique in each row
        for row in logits:
            assert np.sum(row == row.max()) == 1
        # logits depend on context (rows differ)
        assert not np.allclose(logits[0], logits[1])
        assert not np.allclose(logits[1], logits[2])

        # drop positions 1.. from the KV cache and re-decode them: same logits
        mem = llama_cpp.llama_get_memory(ctx)
        assert mem
        assert llama_cpp.llama_memory_seq_rm(mem, 0, 1, -1)
        again = _decode(ctx, batch, toks[1:], 1, n_vocab)
        np.testing.assert_allclose(again, logits[1:], rtol=1e-4, atol=1e-4)

        # a different continuation gives different logits at the last position
        assert llama_cpp.llama_memory_seq_rm(mem, 0, 2, -1)
        other = _decode(ctx, batch, [30], 2, n_vocab)
        assert np.all(np.isfinite(other))
        assert not np.allclose(other[0], logits[2])
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def test_token_prefix_changes_texts_from_id_5(tmp_path):
    a = _load_model(write_llama(tmp_path / "a.gguf"), vocab_only=True)
    b = _load_model(write_llama(tmp_path / "b.gguf", token_prefix="x"), vocab_only=True)
    assert a and b
    try:
        va = llama_cpp.llama_model_get_vocab(a)
        vb = llama_cpp.llama_model_get_vocab(b)
        n = llama_cpp.llama_vocab_n_tokens(va)
        assert n == llama_cpp.llama_vocab_n_tokens(vb)
        n_pieces = n - N_FIXED - N_BYTES
        assert _texts(va, range(N_FIXED)) == _texts(vb, range(N_FIXED))
        assert _texts(va, range(3)) == [b"<unk>", b"<s>", b"</s>"]
        ta = _texts(va, range(N_FIXED, N_FIXED + n_pieces))
        tb = _texts(vb, range(N_FIXED, N_FIXED + n_pieces))
        assert all(x != y for x, y in zip(ta, tb))
        assert tb == [b"x" + x for x in ta]
        assert ta[0] == "\u2581the".encode()
        # byte tokens are shared
        byte_ids = range(N_FIXED + n_pieces, n)
        assert _texts(va, byte_ids) == _texts(vb, byte_ids)
        assert llama_cpp.llama_vocab_get_text(va, N_FIXED + n_pieces + 0x0A) == b"<0x0A>"
        assert llama_cpp.llama_vocab_type(va) == llama_cpp.LLAMA_VOCAB_TYPE_SPM
    finally:
        llama_cpp.llama_model_free(a)
        llama_cpp.llama_model_free(b)


def test_vocab_options_special_ids_and_template(tmp_path):
    tmpl = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    p = write_llama(tmp_path / "o.gguf", vocab_size=300, bos=3, eos=4, chat_template=tmpl)
    m = _load_model(p, vocab_only=True)
    assert m
    try:
        v = llama_cpp.llama_model_get_vocab(m)
        assert llama_cpp.llama_vocab_n_tokens(v) == 300
        assert llama_cpp.llama_vocab_bos(v) == 3
        assert llama_cpp.llama_vocab_eos(v) == 4
        assert llama_cpp.llama_vocab_get_add_bos(v)
        assert llama_cpp.llama_model_chat_template(m, None) == tmpl.encode()
    finally:
        llama_cpp.llama_model_free(m)

    # defaults: <s>=1, </s>=2; a shared-prefix vocab of a different size
    m1 = _load_model(write_llama(tmp_path / "d1.gguf", n_pieces=40), vocab_only=True)
    m2 = _load_model(write_llama(tmp_path / "d2.gguf", vocab_size=340, n_pieces=40), vocab_only=True)
    assert m1 and m2
    try:
        v1 = llama_cpp.llama_model_get_vocab(m1)
        v2 = llama_cpp.llama_model_get_vocab(m2)
        assert llama_cpp.llama_vocab_bos(v1) == 1 and llama_cpp.llama_vocab_eos(v1) == 2
        assert llama_cpp.llama_vocab_n_tokens(v2) == 340
        n1 = llama_cpp.llama_vocab_n_tokens(v1)
        assert _texts(v1, range(n1)) == _texts(v2, range(n1))
    finally:
        llama_cpp.llama_model_free(m1)
        llama_cpp.llama_model_free(m2)


def test_tokenize_roundtrip(tiny_path):
    m = _load_model(tiny_path, vocab_only=True)
    assert m
    try:
        v = llama_cpp.llama_model_get_vocab(m)
        text = "hello the world\nÿ!".encode()
        buf = (llama_cpp.llama_token * 64)()
        n = llama_cpp.llama_tokenize(v, text, len(text), buf, 64, True, False)
        assert 0 < n < 64
        ids = list(buf[:n])
        assert ids[0] == 1  # add_bos
        out = b""
        piece = ctypes.create_string_buffer(32)
        for t in ids[1:]:
            k = llama_cpp.llama_token_to_piece(v, t, piece, 32, 0, False)
            assert k >= 0
            out += piece.raw[:k]
        assert out.lstrip(b" ") == text
    finally:
        llama_cpp.llama_model_free(m)


def test_broken_files_do_not_load(tmp_path, tiny_path):
    size = tiny_path.stat().st_size
    cut = truncate_copy(tiny_path, tmp_path / "cut.gguf", size // 2)
    assert cut.stat().st_size == size // 2
    assert truncate_copy(tiny_path, tmp_path / "cut2.gguf", -10).stat().st_size == size - 10
    assert not _load_model(cut)
    bad = write_not_gguf(tmp_path / "bad.gguf")
    assert bad.read_bytes()[:4] != b"GGUF"
    assert not _load_model(bad)


def test_build_vocab_rejects_bad_sizes():
    with pytest.raises(ValueError):
        build_vocab(N_FIXED + N_BYTES)
    with pytest.raises(ValueError):
        build_vocab(300, n_pieces=100)
    toks, scores, types = build_vocab(300)
    assert len(toks) == len(scores) == len(types) == 300
    assert len(set(toks)) == 300


def test_load_logs_are_valid_utf8(tiny_path):
    # llama-cpp-python's default log callback decodes every message as UTF-8; llama.cpp
    # previews the token list cut at 40 bytes, so the first tokens must not split a
    # multi-byte character there.
    msgs: list[bytes] = []

    @llama_cpp.llama_log_callback
    def cb(level, text, user_data):
        msgs.append(bytes(text or b""))

    llama_cpp.llama_log_set(cb, None)
    try:
        m = _load_model(tiny_path, vocab_only=True)
        assert m
        llama_cpp.llama_model_free(m)
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    joined = b"".join(msgs)
    assert b"tokenizer.ggml.tokens" in joined
    for t in msgs:
        t.decode("utf-8")
