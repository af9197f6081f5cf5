"""The grammar engine behind core/grammar.py's Matcher: llguidance (PyPI `llguidance`, one wheel
without dependencies), imported in this module's functions only, when a reply first asks for a
grammar: free text never loads it.

Chosen over xgrammar and outlines-core by bench/grammar_engines.py (README, "Structured output"):
on Qwen2.5's 151,936 tokens it compiles a JSON schema in about 1 ms (xgrammar 20-120 ms,
outlines-core 1-21 s, which indexes the whole vocabulary per schema), computes a mask in tens of
microseconds (a target pass takes tens of milliseconds), takes Lark, GBNF, regular expressions and
JSON schemas, names the forced bytes, and installs alone (xgrammar brings torch, transformers and
triton).

- `Tokenizer(vocab)`: llguidance's tokenizer from a llama.cpp vocabulary's own tokens (`piece`:
  the bytes a token adds; a control token, which adds none, becomes a special token under its
  name) and its tokenizer: nothing from a model hub. About 1.5 s for Qwen2.5: once per engine.
- `compile(tokenizer, grammar, seconds)`: a types.Grammar compiled within `seconds` (and within
  llguidance's own fuel limits), or an EdgespecError that names the schema keyword at fault.
- `Compiled.matcher()`: a Matcher at the grammar's start, for one reply.

JSON is written on one line with json.dumps's separators (", " and ": "): no whitespace for a
model to loop on, and the separators join the keys in spans the grammar forces.
"""

from __future__ import annotations

import threading

import numpy as np

from edge_spec.defaults import JSON_SEPARATORS
from edge_spec.types import EdgespecError, Grammar

# llguidance's compiler recurses once per level of a grammar's nesting: a 3,000-rule chain
# overflows a thread's default 8 MiB stack (SIGSEGV, the whole server gone); with 256 MiB (address
# space, touched only as used) chains compile up to llguidance's own symbol limit, which it reports
# as an error (tests/core/test_llg.py)
COMPILE_STACK_BYTES = 256 << 20
_STACK_SIZE = threading.Lock()
# JSON's layout (a schema's own "x-guidance" may change it); see the module docstring
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": JSON_SEPARATORS[0], "key_separator": JSON_SEPARATORS[1]}


class Tokenizer:
    """llguidance's view of one llama.cpp vocabulary (a backend with piece, token_text, is_eog,
    tokenize and vocab_size)."""

    def __init__(self, vocab):
        import llguidance

        n = vocab.vocab_size
        pieces = [vocab.piece(t) for t in range(n)]
        special = [t for t, p in enumerate(pieces) if not p and vocab.token_text(t)]
        ends = [t for t in special if vocab.is_eog(t)] or [vocab.facts.eos]
        names = {t: b"\xff" + vocab.token_text(t).encode() for t in special}  # llguidance's mark for special tokens

        class Source:  # what llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id, special_token_ids = ends[0], None, special
            tokens = [names.get(t, p) for t, p in enumerate(pieces)]

            def __call__(self, text):
                return vocab.tokenize(text.decode("utf-8", "replace") if isinstance(text, bytes) else text,
                                      add_special=False, parse_special=False)

        self.vocab = vocab
        self.vocab_size = n
        self.end_tokens = frozenset(ends)
        self.llg = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Source()), n_vocab=n, eos_token=ends)

    def tokens(self, data: bytes) -> tuple[int, ...]:
        """The tokens of the longest whole-character prefix of `data`."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            text = data[: e.start].decode("utf-8")
        return tuple(self.vocab.tokenize(text, add_special=False, parse_special=False)) if text else ()


class LlgMatcher:
    """core.grammar.Matcher over an llguidance LLMatcher."""

    def __init__(self, inner, tokenizer: Tokenizer):
        self._m, self._tokenizer = inner, tokenizer
        self.vocab_size, self.end_tokens = tokenizer.vocab_size, tokenizer.end_tokens
        self._words = np.zeros((self.vocab_size + 31) // 32, dtype=np.int32)  # llguidance's bitmask

    def mask(self) -> np.ndarray:  # [vocab] bool
        self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        if self._m.is_error():  # a limit of the engine reached: no token is legal
            return np.zeros(self.vocab_size, dtype=bool)
        return np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self.vocab_size].view(bool)

    def consume(self, token: int) -> None:
        if not self._m.consume_token(token):
            raise EdgespecError(f"the grammar engine refused token {token}: {self._m.get_error()}")

    def forced(self) -> tuple[int, ...]:
        """The target's tokens for the bytes the grammar forces next (its tokenization of them:
        verification decides whether the target writes them so)."""
        return self._tokenizer.tokens(self._m.compute_ff_bytes())

    def copy(self) -> LlgMatcher:
        return LlgMatcher(self._m.deep_copy(), self._tokenizer)


class Compiled:
    """A grammar compiled for one vocabulary: each reply takes a matcher of its own."""

    def __init__(self, inner, tokenizer: Tokenizer):
        self._start, self._tokenizer = inner, tokenizer

    def matcher(self) -> LlgMatcher:
        return LlgMatcher(self._start.deep_copy(), self._tokenizer)


def compile(tokenizer: Tokenizer, grammar: Grammar, seconds: float) -> Compiled:
    """`grammar` for the tokenizer's vocabulary, in a thread given `seconds` (llguidance's fuel
    limits bound the work itself; a compile still running then finishes unused)."""
    import llguidance

    source = _source(llguidance, grammar)
    done: dict = {}

    def work():
        try:
            done["matcher"] = llguidance.LLMatcher(tokenizer.llg, source, log_level=0)
        except Exception as e:  # noqa: BLE001 (handed to the caller)
            done["error"] = e

    with _STACK_SIZE:  # the size applies to threads started while it is set: this one only
        before = threading.stack_size(COMPILE_STACK_BYTES)
        try:
            thread = threading.Thread(target=work, name="edgespec-grammar", daemon=True)
            thread.start()
        finally:
            threading.stack_size(before)
    thread.join(seconds)
    if thread.is_alive():
        raise EdgespecError(f"the {_what(grammar)} took longer than {seconds:g} s to compile: simplify it "
                            "(fewer alternatives, shorter patterns, less nesting)")
    if "error" in done:
        raise EdgespecError(f"invalid {_what(grammar)}: {done['error']}")
    matcher = done["matcher"]
    if matcher.is_error():
        raise EdgespecError(_problem(grammar, matcher.get_error()))
    return Compiled(matcher, tokenizer)


def _source(llguidance, grammar: Grammar) -> str:
    """llguidance's grammar text for a types.Grammar."""
    try:
        if grammar.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(grammar.source, defaults=JSON_LAYOUT)
        if grammar.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(grammar.source)
        return llguidance.grammar_from("grammar", grammar.source)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise EdgespecError(f"invalid {_what(grammar)}: {e}") from None


def _what(grammar: Grammar) -> str:
    return {"json_schema": "JSON schema", "lark": "grammar", "regex": "regular expression"}[grammar.kind]


def _problem(grammar: Grammar, error: str) -> str:
    """llguidance's complaint as a message that says what to change (its text names the keyword:
    'Unimplemented keys: ["if", "then"]', 'Invalid type: strin', "Unknown format: ...")."""
    error = " ".join(error.split())[:300] or "no details"
    if "Unimplemented keys" in error:
        error = error.replace("Unimplemented keys", "keywords the grammar engine cannot enforce")
        return f"unsupported JSON schema: {error}; remove them (or describe the constraint in the prompt)"
    return f"invalid {_what(grammar)}: {error}"
