"""Which grammar engine computes token masks fastest over the default target's vocabulary?

llguidance, xgrammar and outlines-core, each given the GGUF's own vocabulary (llama.cpp's token
bytes, read from the file: no model hub), compile JSON schemas of bench/structured_items.json and
then walk each schema's example answer, as llama.cpp tokenizes it: at every token the mask of the
allowed tokens is computed (the cost a constrained decoding step pays) and the token consumed.
Reported per engine and schema: compile seconds, mask microseconds (median and 95th percentile
over the walk), and the whole walk.

    python -m bench.grammar_engines [--schemas invoice,meeting,job,bug,classify] [--reps 3]

An engine that is not installed is reported as such; the three need not share a venv (the
comparison in README ran them from one venv with all three, xgrammar's torch the CPU one).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

ITEMS = Path(__file__).with_name("structured_items.json")
DEFAULT_SCHEMAS = "invoice,meeting,job,bug,classify"


def vocabulary(vocab) -> tuple[list[bytes], list[int], list[int]]:
    """(token bytes, special tokens, end-of-generation tokens) of a llama.cpp vocabulary: the
    bytes a token adds to the text (`piece`); a special (control) token adds none."""
    pieces = [vocab.piece(t) for t in range(vocab.n_tokens)]
    special = [t for t, p in enumerate(pieces) if not p and vocab.token_text(t)]
    return pieces, special, [t for t in special if vocab.is_eog(t)]


# --- one adapter per engine: compile(schema) -> walker; walker.mask(); walker.consume(token) ----
class Llguidance:
    name = "llguidance"

    def __init__(self, vocab, pieces, special, eog):
        import llguidance

        class Source:  # what llguidance.TokenizerWrapper reads
            eos_token_id, bos_token_id = eog[0], None
            tokens = [b"\xff" + vocab.token_text(t).encode() if t in set(special) else p for t, p in enumerate(pieces)]
            special_token_ids = special

            def __call__(self, text):
                text = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
                return vocab.tokenize(text, add_special=False, parse_special=False)

        self.llg = llguidance
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Source()), eos_token=eog)
        self.words = (len(pieces) + 31) // 32

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        out = np.zeros(self.words, np.int32)

        class Walk:
            def mask(self):
                matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

            def consume(self, token):
                if not matcher.consume_token(token):
                    raise ValueError(matcher.get_error())
        return Walk()


class Xgrammar:
    name = "xgrammar"

    def __init__(self, vocab, pieces, special, eog):
        import xgrammar

        self.xgr = xgrammar
        encoded = [b"" if t in set(special) else p for t, p in enumerate(pieces)]
        info = xgrammar.TokenizerInfo(encoded, xgrammar.VocabType.RAW, vocab_size=len(pieces), stop_token_ids=eog)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
        self.n = len(pieces)

    def compile(self, schema: dict):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=True)
        matcher = self.xgr.GrammarMatcher(compiled)
        out = self.xgr.allocate_token_bitmask(1, self.n)

        class Walk:
            def mask(self):
                matcher.fill_next_token_bitmask(out)

            def consume(self, token):
                if not matcher.accept_token(token):
                    raise ValueError(f"xgrammar refused token {token}")
        return Walk()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, vocab, pieces, special, eog):
        import outlines_core

        self.oc = outlines_core
        table: dict[bytes, list[int]] = {}
        for t, p in enumerate(pieces):
            if p and t not in eog:
                table.setdefault(p, []).append(t)
        self.vocabulary = outlines_core.Vocabulary(eog[0], table)
        self.words = (len(pieces) + 31) // 32

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        guide = self.oc.Guide(self.oc.Index(regex, self.vocabulary))
        out = np.zeros(self.words, np.int32)

        class Walk:
            def mask(self):
                guide.write_mask_into(out.ctypes.data, out.size, 4)

            def consume(self, token):
                guide.advance(token, return_tokens=False)
        return Walk()


ENGINES = (Llguidance, Xgrammar, OutlinesCore)


def measure(engine, schema: dict, tokens: list[int]) -> dict:
    t0 = time.perf_counter()
    walk = engine.compile(schema)
    compiled = time.perf_counter() - t0
    masks = []
    t1 = time.perf_counter()
    for token in tokens:
        t = time.perf_counter()
        walk.mask()
        masks.append(time.perf_counter() - t)
        walk.consume(token)
    whole = time.perf_counter() - t1
    masks.sort()
    return {"compile_s": compiled, "mask_us_median": 1e6 * statistics.median(masks),
            "mask_us_p95": 1e6 * masks[int(0.95 * (len(masks) - 1))], "walk_ms": 1e3 * whole, "tokens": len(tokens)}


def main() -> None:
    from edge_spec.backends.llama_cpp import LlamaVocab
    from edge_spec.models.registry import DEFAULT_TARGET, require

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schemas", default=DEFAULT_SCHEMAS)
    parser.add_argument("--reps", type=int, default=3, help="walks per engine and schema (the best is kept)")
    args = parser.parse_args()
    items = {i["id"]: i for i in json.loads(ITEMS.read_text())}
    vocab = LlamaVocab(str(require(DEFAULT_TARGET)))
    pieces, special, eog = vocabulary(vocab)
    print(f"vocabulary: {len(pieces)} tokens, {len(special)} special, end-of-generation {eog}")
    engines = []
    for cls in ENGINES:
        t0 = time.perf_counter()
        try:
            engines.append(cls(vocab, pieces, special, eog))
        except ImportError as e:
            print(f"{cls.name}: not installed ({e})")
            continue
        print(f"{cls.name}: tokenizer built in {time.perf_counter() - t0:.2f} s")
    rows = []
    for name in args.schemas.split(","):
        item = items[name]
        tokens = vocab.tokenize(json.dumps(item["example"]), add_special=False, parse_special=False)
        for engine in engines:
            try:
                runs = [measure(engine, item["schema"], tokens) for _ in range(args.reps)]
            except Exception as e:  # noqa: BLE001 (an engine that cannot take a schema: reported)
                rows.append({"schema": name, "engine": engine.name, "error": str(e)[:160]})
                print(json.dumps(rows[-1]))
                continue
            best = min(runs, key=lambda r: r["walk_ms"])
            rows.append({"schema": name, "engine": engine.name} | {k: round(v, 4) if isinstance(v, float) else v
                                                                   for k, v in best.items()})
            print(json.dumps(rows[-1]))
    print("\nengine          schemas  compile s (median)  mask us (median of medians)  p95 us (max)")
    for engine in engines:
        ok = [r for r in rows if r["engine"] == engine.name and "error" not in r]
        if ok:
            print(f"{engine.name:15} {len(ok):7}  {statistics.median(r['compile_s'] for r in ok):18.4f}  "
                  f"{statistics.median(r['mask_us_median'] for r in ok):27.1f}  "
                  f"{max(r['mask_us_p95'] for r in ok):12.1f}")


if __name__ == "__main__":
    main()
