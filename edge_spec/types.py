"""Small frozen dataclasses that cross module boundaries.

Notation used across edgespec (Leviathan et al. 2023; Chen et al. 2023):
  p  — the target's distribution at a position, after the sampling transform
  q  — the drafter's distribution at the same position, after the same transform
  k  — the number of drafted tokens in one step
A step yields the *accepted* draft tokens, then one more token: the *recovered* token (sampled
from the residual max(p - q, 0) after a rejection) or the *bonus* token (sampled from p after
all k drafts were accepted).
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field, replace

import numpy as np


class EdgespecError(Exception):
    """An error the user can fix; its message says how. The CLI prints it on one line."""


class WorkerLost(EdgespecError):
    """The target's process ended because an RPC worker was lost (backends/isolated.py): this
    engine cannot generate again; the process, the session and the server go on."""


MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs
GRAMMAR_KINDS = ("json_schema", "lark", "regex")


@dataclass(frozen=True)
class Grammar:
    """What a reply must match, as data: a JSON schema (as JSON text), a Lark grammar (GBNF, as
    llama.cpp's `grammar`, is converted to Lark) or a regular expression. The engine compiles it
    for the target's vocabulary (core/llg.py, with llguidance) and masks p and q with it
    (core/grammar.py). Make one with the constructors:

        Grammar.json_schema({"type": "object", ...}, strict=True)   # OpenAI's json_schema
        Grammar.json()                                              # any JSON object (json_object)
        Grammar.lark('start: "yes" | "no"')                          # or a GBNF grammar
        Grammar.regex(r"[0-9]{3}-[0-9]{4}")
    """

    kind: str    # GRAMMAR_KINDS
    source: str  # the schema's JSON text, the grammar, the pattern

    def __post_init__(self):
        if self.kind not in GRAMMAR_KINDS or not isinstance(self.source, str):
            raise EdgespecError(f"a grammar is one of {', '.join(GRAMMAR_KINDS)} given as text: make one with "
                                "Grammar.json_schema(schema), Grammar.json(), Grammar.lark(text) or "
                                "Grammar.regex(text)")

    @classmethod
    def json_schema(cls, schema: dict | str, strict: bool = False) -> "Grammar":
        """A JSON schema (a dict, or its JSON text). strict=True (OpenAI's strict mode): objects
        that do not say otherwise allow no properties beyond those they name, as OpenAI's strict
        outputs never hold keys the schema does not name; without it JSON Schema's own default
        holds (extra properties allowed). Either way the reply validates against the schema."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise EdgespecError(f"the JSON schema is not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise EdgespecError(f"a JSON schema is an object, not {type(schema).__name__}")
        return cls("json_schema", json.dumps(_closed(schema) if strict else schema, sort_keys=False))

    @classmethod
    def json(cls) -> "Grammar":
        """Any JSON object (OpenAI's json_object, Ollama's format "json")."""
        return cls("json_schema", '{"type": "object"}')

    @classmethod
    def lark(cls, text: str) -> "Grammar":
        return cls("lark", text)

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        return cls("regex", pattern)


def _closed(schema):
    """The schema with additionalProperties false wherever an object schema names properties and
    does not say otherwise (strict mode)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) if k not in ("const", "enum", "default", "examples") else v for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and "unevaluatedProperties" not in out:
        out["additionalProperties"] = False
    return out


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 are off.

    The same transform is applied to the target's and the drafter's logits, which is what keeps
    speculative sampling lossless with respect to the *transformed* target distribution.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    seed: int | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    # per emitted token, the target's log-probability and this many most probable alternatives
    # (Step.logprobs); None: none (nothing computed)
    logprobs: int | None = None
    # what the reply must match (a JSON schema, a grammar): p and q masked to it; None: free text
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        self._check_types()
        checks = [
            (math.isfinite(self.temperature) and self.temperature >= 0, "--temp must be >= 0 (0 = greedy)"),
            (self.top_k >= 0, "--top-k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1] (1 = off)"),
            (0 <= self.min_p < 1, "--min-p must be in [0, 1) (0 = off)"),
            (self.max_tokens >= 1, "-n/--max-tokens must be >= 1"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"logprobs must be between 0 and {MAX_TOP_LOGPROBS} alternatives"),
        ]
        for ok, message in checks:
            if not ok:
                raise EdgespecError(f"invalid sampling value: {message}")

    def _check_types(self) -> None:
        """Values of the wrong type are the caller's error, said as such (not a TypeError from
        deep inside); stop becomes a tuple of strings."""
        def number(v, integral=False):
            return isinstance(v, numbers.Integral if integral else numbers.Real) and not isinstance(v, bool)

        wrong = [name for name, integral in (("temperature", False), ("top_p", False), ("min_p", False),
                                             ("top_k", True), ("max_tokens", True))
                 if not number(getattr(self, name), integral)]
        if self.logprobs is not None and not number(self.logprobs, True):
            wrong.append("logprobs (an integer, or None)")
        if self.seed is not None and not (number(self.seed, True) and self.seed >= 0):
            wrong.append("seed (an integer >= 0, or None)")
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            wrong.append("grammar (an edge_spec.Grammar, e.g. Grammar.json_schema(schema), or None)")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            wrong.append("stop (a string or a list of strings)")
        if wrong:
            raise EdgespecError(f"invalid sampling value: wrong type for {', '.join(wrong)}; temperature, top_p "
                                "and min_p are numbers, top_k and max_tokens integers")
        object.__setattr__(self, "stop", tuple(stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


@dataclass(frozen=True)
class Draft:
    """Tokens proposed by a drafter for the positions after the context.

    probs is q for each drafted position ([k, vocab], rows sum to 1), or None when the drafter
    has no distribution (n-gram lookup, or any greedy draft); the verifier then treats each
    token as drawn from a one-hot q, which keeps the rule lossless. A draft that mixes the two
    (a model's tokens and the spans a grammar forces, core/grammar.py, or an n-gram match a draft
    model continues) gives k rows, None for each token proposed without a distribution; `forced`
    marks the tokens proposed ahead of the drafter, `lead` names where they came from.
    """

    tokens: tuple[int, ...]
    probs: np.ndarray | tuple[np.ndarray | None, ...] | None  # [k, vocab], k rows, or None
    source: str  # the acceptance-statistics key, e.g. "model", "ngram", "ngram:prompt" or "ngram:long"
    seconds_per_token: float | None = None  # drafter's steady-state cost; None = free or unknown
    catch_up: tuple[int, float] | None = None  # (tokens, seconds) the drafter read first, unseen before
    forced: tuple[bool, ...] = ()  # per token: proposed ahead of the drafter (statistics key `lead`); () = none
    # the statistics key of the tokens `forced` marks: "grammar" for the span a grammar forces, or
    # the n-gram key of a match a draft model continues in the same pass (core/runtime.py)
    lead: str = "grammar"

    def __len__(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one draft: the first n_accepted draft tokens stand, then `token`
    (recovered after a rejection, bonus when n_accepted == len(draft))."""

    n_accepted: int
    token: int


@dataclass(frozen=True)
class Stats:
    """Running statistics of one generation (decode phase only, prompt evaluation excluded)."""

    n_tokens: int = 0          # tokens emitted
    n_steps: int = 0           # target forward passes in the decode phase
    n_drafted: int = 0         # draft tokens sent to verification
    n_accepted: int = 0        # of those, accepted
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    plain_step_seconds: float | None = None  # measured cost of one plain target step
    by_source: tuple[tuple[str, int, int, int], ...] = ()  # (source, drafted, accepted, drafts rejected)
    notes: tuple[str, ...] = ()  # what went wrong and how the reply went on (a drafter that failed)
    drafted_ahead: int = 0     # parallel schedule: drafted tokens that were ready when asked for
    grown_ahead: int = 0       # best-first trees grown during the target's previous pass, and used

    @property
    def acceptance_rate(self) -> float:
        return self.n_accepted / self.n_drafted if self.n_drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per target pass (1.0 for plain decoding)."""
        return self.n_tokens / self.n_steps if self.n_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    @property
    def speedup_vs_plain(self) -> float | None:
        """Decode speed relative to plain decoding at the step cost measured in this session."""
        if not self.plain_step_seconds or not self.decode_seconds:
            return None
        return self.tokens_per_second * self.plain_step_seconds

    def as_dict(self) -> dict:
        return {
            "tokens": self.n_tokens,
            "steps": self.n_steps,
            "drafted": self.n_drafted,
            "accepted": self.n_accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "tokens_per_second": round(self.tokens_per_second, 3),
            "speedup_vs_plain": None if self.speedup_vs_plain is None else round(self.speedup_vs_plain, 3),
            "prompt_tokens": self.prompt_tokens,
            "prompt_seconds": round(self.prompt_seconds, 4),
            "decode_seconds": round(self.decode_seconds, 4),
            "by_source": {s: {"drafted": d, "accepted": a, "rejected": r} for s, d, a, r in self.by_source},
            "drafted_ahead": self.drafted_ahead, "grown_ahead": self.grown_ahead,
        }


@dataclass(frozen=True)
class Step:
    """One runtime step: the tokens it emitted, where each came from, the new text."""

    tokens: tuple[int, ...]
    from_draft: tuple[bool, ...]
    text: str
    stats: Stats
    # "stop" (EOS or stop string), "length", "context", "cancelled", "no_legal_token" (a grammar
    # allowed no token: core/grammar.py)
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, when SamplingParams.logprobs asked for them


@dataclass(frozen=True)
class TokenLogprob:
    """The target's log-probability of an emitted token, from its raw logits (log-softmax before
    temperature and the filters: the model's own distribution), and the most probable tokens at
    that position with theirs, most probable first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class ModelFacts:
    """Facts read from a GGUF file."""

    path: str
    architecture: str
    name: str
    n_params: int
    file_size: int
    n_layers: int
    n_ctx_train: int
    n_embd: int
    vocab_size: int
    vocab_type: int
    bos: int
    eos: int
    chat_template: str | None
    description: str = ""
    extra: dict = field(default_factory=dict)


# --- what a backend or a drafter can do, as data (never asked with hasattr or a class check) ---
@dataclass(frozen=True)
class Capabilities:
    """What a backend can do beyond the Backend protocol (backends/base.py), read at assembly
    (pipeline/assemble.py) and by the runtime; a backend declares it once, as its `capabilities`."""

    kind: str                       # one of defaults.BACKENDS: whose cost model and calibrations apply
    trees: bool                     # forward_tree/keep_path: a token tree verified in one pass
    threads_settable: bool          # set_threads(n) between passes (parallel schedules split cores)
    gpu_layers: int = 0             # blocks on a GPU (llama.cpp's -ngl); 0: computed on the CPU
    disk_bytes: int = 0             # weights read from disk at every pass (a paged target; has evict())
    workers: tuple[str, ...] = ()   # RPC workers holding its gpu_layers (backends/isolated.py)
    tree_growth: bool = False       # extend_tree/end_tree: a tree grown over passes, each node evaluated once
    siblings: bool = False          # sibling(): a second context on the same weights (benchmarks)
    # forward(tokens, logits=[bool per token]): logits only for the rows asked (a grammar's
    # verification skips the rows whose token is the only legal one)
    row_logits: bool = False


@dataclass(frozen=True)
class DrafterCapabilities:
    """What a drafter can do beyond propose() (core/drafters/__init__.py)."""

    drafts_ahead: bool = False      # extend(seq, sp, rng): one token at a time, for the parallel schedule's thread
    grows_trees: bool = False       # propose_best_first(): best-first token trees (core/drafters/spectree.py)
    tries: bool = False             # trie(context, budget, branches): its candidate continuations as a token trie
    # propose(..., grammar=GrammarView): masks its q with the grammar and drafts the spans it forces
    # (core/grammar.py); the runtime cuts any other drafter's draft at its first illegal token
    follows_grammar: bool = False


@dataclass(frozen=True)
class Costs:
    """Measured seconds the Controller is seeded with: one target pass over n tokens, by n (1
    included), and one drafter step where a draft model runs."""

    target: dict[int, float]
    drafter_step: float | None = None
