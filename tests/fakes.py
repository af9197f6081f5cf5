"""Deterministic fakes for the speculative loop: models given by a distribution per prefix, and a
Random that walks every outcome of a piece of code with its exact probability.

Notation as in edge_spec/types.py: p = target distribution, q = draft distribution.
"""

from __future__ import annotations

import weakref
from typing import Callable, Hashable, Sequence

import numpy as np

from edge_spec.core.controller import Controller
from edge_spec.types import Capabilities, Draft, DrafterCapabilities, EdgespecError, SamplingParams

DistFn = Callable[[tuple[int, ...]], np.ndarray]  # whole token history → [vocab] probabilities
_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # dist_fn → {prefix: log p}, for FakeModel


# --- models --------------------------------------------------------------------------------
class FakeModel:
    """A backend with the interface the runtime uses: forward appends tokens to `tokens` and
    returns log(dist_fn(prefix)) for the requested positions, float64, -inf where dist is 0."""

    # a CPU model with token trees and logits for the rows asked
    capabilities = Capabilities("llama", trees=True, threads_settable=False, row_logits=True)

    def __init__(self, dist_fn: DistFn, vocab: int, n_ctx: int = 64, eos: int | None = None,
                 pieces: Sequence[bytes] | None = None):
        self.dist_fn = dist_fn
        self.vocab_size = vocab
        self.n_ctx = n_ctx
        self.eos = eos
        self.pieces = list(pieces) if pieces is not None else [bytes([97 + t]) for t in range(vocab)]
        self.tokens: list[int] = []
        self.max_len = 0          # the most tokens the cache ever held
        self.n_evaluated = 0      # tokens passed to forward, over the fake's lifetime
        # rows by prefix, shared by every fake of this dist_fn (an enumeration makes a fresh
        # runtime, and fakes, for each random path)
        self._rows: dict[tuple[int, ...], np.ndarray] = _ROWS.setdefault(dist_fn, {})

    def logprobs(self, prefix: tuple[int, ...]) -> np.ndarray:  # [vocab]
        row = self._rows.get(prefix)
        if row is None:
            p = np.asarray(self.dist_fn(prefix), dtype=np.float64)
            assert p.shape == (self.vocab_size,) and abs(p.sum() - 1) < 1e-12 and (p >= 0).all()
            with np.errstate(divide="ignore"):
                row = self._rows[prefix] = np.log(p)
        return row

    def forward(self, tokens: Sequence[int], logits="all") -> np.ndarray:
        if isinstance(logits, str) and logits not in ("all", "last", "none"):
            raise ValueError(logits)
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise EdgespecError(f"context full: {len(self.tokens)} + {len(tokens)} > {self.n_ctx}")
        start = len(self.tokens)
        self.tokens.extend(int(t) for t in tokens)
        self.max_len = max(self.max_len, len(self.tokens))
        self.n_evaluated += len(tokens)
        if not isinstance(logits, str):  # a bool per token
            assert len(logits) == len(tokens)
            self.rows_skipped = getattr(self, "rows_skipped", 0) + sum(not w for w in logits)
            rows = [self.logprobs(tuple(self.tokens[: start + j + 1])) for j, w in enumerate(logits) if w]
            return np.stack(rows) if rows else np.zeros((0, self.vocab_size))
        if logits == "none" or not tokens:
            return np.zeros((0, self.vocab_size))
        first = start if logits == "all" else len(self.tokens) - 1
        return np.stack([self.logprobs(tuple(self.tokens[: j + 1])) for j in range(first, len(self.tokens))])

    def truncate(self, n: int) -> None:
        del self.tokens[n:]

    def forward_tree(self, pending: int, tree) -> np.ndarray:
        """As LlamaCppBackend.forward_tree: rows after the pending token and after each node."""
        if len(self.tokens) + len(tree) + 1 > self.n_ctx:
            raise EdgespecError("context full")
        self.tokens.append(int(pending))
        self.n_trees = getattr(self, "n_trees", 0) + 1
        self.max_len = max(self.max_len, len(self.tokens) + len(tree))
        self.n_evaluated += len(tree) + 1
        self._tree = tree
        rows = [self.logprobs(tuple(self.tokens))]
        for i in range(len(tree)):
            rows.append(self.logprobs(tuple(self.tokens) + tuple(tree.tokens[n] for n in tree.path(i))))
        return np.stack(rows)

    def keep_path(self, path: Sequence[int]) -> None:
        assert not path or list(path) == self._tree.path(path[-1]), "keep_path needs a branch from the root down"
        self.tokens.extend(int(self._tree.tokens[i]) for i in path)
        self._tree = None

    def piece(self, token: int) -> bytes:
        return self.pieces[token]

    def is_eog(self, token: int) -> bool:
        return self.eos is not None and token == self.eos

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Greedy longest-piece match (pieces are assumed to cover the text)."""
        data, out = text.encode(), []
        while data:
            t = max((t for t, pc in enumerate(self.pieces) if pc and data.startswith(pc)),
                    key=lambda t: len(self.pieces[t]))
            out.append(t)
            data = data[len(self.pieces[t]):]
        return out

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")


def copy_model(model: FakeModel) -> FakeModel:
    """A second instance of the same model (own cache), e.g. for the target drafting for itself."""
    return FakeModel(model.dist_fn, model.vocab_size, model.n_ctx, model.eos, model.pieces)


# --- distributions -------------------------------------------------------------------------
def _gen(seed: int, prefix: tuple[int, ...], order: int | None) -> np.random.Generator:
    key = prefix if order is None else prefix[-order:]
    return np.random.default_rng([seed, len(key), *key])  # the length keeps (0,) and (0, 0) apart


def _dense(g: np.random.Generator, vocab: int) -> np.ndarray:
    return g.dirichlet(np.ones(vocab))


def _with_zeros(g: np.random.Generator, vocab: int) -> np.ndarray:
    p = _dense(g, vocab)
    n_zero = int(g.integers(1, vocab))  # 1 .. vocab - 1 zeros
    p[g.permutation(vocab)[:n_zero]] = 0.0
    return p / p.sum()


def _one_hot(g: np.random.Generator, vocab: int) -> np.ndarray:
    p = np.zeros(vocab)
    p[int(g.integers(vocab))] = 1.0
    return p


KINDS = {"dense": (_dense,), "zeros": (_with_zeros,), "onehot": (_one_hot,),
         "mixed": (_dense, _with_zeros, _one_hot)}


def random_dist(seed: int, vocab: int, kind: str = "mixed", order: int | None = None) -> DistFn:
    """A distribution per prefix, drawn from a generator seeded by (seed, prefix); `order` makes
    it depend only on the last `order` tokens (a Markov chain, so n-gram drafts get accepted)."""
    makers = KINDS[kind]

    def dist(prefix: tuple[int, ...]) -> np.ndarray:
        g = _gen(seed, prefix, order)
        return makers[int(g.integers(len(makers)))](g, vocab)

    return dist


def disjoint_pair(seed: int, vocab: int) -> tuple[DistFn, DistFn]:
    """p and q whose supports never meet: every model draft is rejected."""

    def split(prefix):
        g = _gen(seed, prefix, None)
        perm = g.permutation(vocab)
        cut = int(g.integers(1, vocab))
        return g, perm[:cut], perm[cut:]

    def p(prefix):
        g, mine, _ = split(prefix)
        out = np.zeros(vocab)
        out[mine] = g.dirichlet(np.ones(len(mine)))
        return out

    def q(prefix):
        g, _, theirs = split(prefix)
        out = np.zeros(vocab)
        g.random()  # a different stream from p's
        out[theirs] = g.dirichlet(np.ones(len(theirs)))
        return out

    return p, q


def mixture(a: DistFn, b: DistFn, w: float) -> DistFn:
    """(1 - w) a + w b: a draft close to the target when w is small."""
    return lambda prefix: (1 - w) * a(prefix) + w * b(prefix)


def peaked_dist(seed: int, vocab: int, order: int | None = None, gap: float = 0.1) -> DistFn:
    """Dense distributions whose largest entry beats the runner-up by at least `gap`: greedy
    decoding has no near-ties."""

    def dist(prefix):
        g = _gen(seed, prefix, order)
        p = g.dirichlet(np.ones(vocab))
        top = int(g.integers(vocab))
        p = 0.5 * p
        p[top] += 0.5 + gap  # top >= 0.5 + gap, everything else <= 0.5
        return p / p.sum()

    return dist


def scripted(script: Sequence[int], vocab: int, after: int = 0) -> DistFn:
    """One-hot at script[len(prefix) - after]: a model that says exactly `script`, then repeats
    its last token."""

    def dist(prefix):
        p = np.zeros(vocab)
        p[script[min(len(prefix) - after, len(script) - 1)]] = 1.0
        return p

    return dist


def target_joint(dist_fn: DistFn, prompt: Sequence[int], n: int, vocab: int,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None) -> dict[tuple, float]:
    """Exact distribution of the next n tokens: prod_t p(x_t | prompt + x_<t)."""
    out: dict[tuple, float] = {}

    def walk(seq: tuple[int, ...], weight: float):
        if len(seq) == n:
            out[seq] = weight
            return
        p = np.asarray(dist_fn(tuple(prompt) + seq), dtype=np.float64)
        if transform is not None:
            p = transform(p)
        for x in range(vocab):
            if p[x] > 0:
                walk(seq + (x,), weight * p[x])

    walk((), 1.0)
    return out


def max_deviation(a: dict, b: dict) -> float:
    return max((abs(a.get(key, 0.0) - b.get(key, 0.0)) for key in a.keys() | b.keys()), default=0.0)


# --- drafters and controllers --------------------------------------------------------------
class FixedController(Controller):
    """Always drafts k tokens (bounded by the runtime's cap), from the very first step, from every
    drafter. It learns nothing from timings, so a run is a deterministic function of the
    random choices (the Enumerator needs that)."""

    def __init__(self, k: int, extend: int | None = None):
        super().__init__()
        self.k = k
        self.extend = k if extend is None else extend  # tokens a draft model adds to an n-gram draft

    def draft_length(self, source: str, cap: int, behind: int = 0) -> int:
        return max(0, min(self.k, cap))

    def extension(self, lead: str, n: int, source: str, cap: int, behind: int = 0) -> int:
        return max(0, min(self.extend, cap))  # a draft model continues every n-gram draft

    def could_pay(self, source: str) -> bool:
        return True

    def observe_verify(self, n_tokens: int, seconds: float) -> None:
        pass

    def observe_draft(self, source: str, k: int, n_accepted: int, seconds_per_token: float | None,
                      catch_up=None) -> None:
        pass


class FunctionDrafter:
    """A drafter without probabilities whose proposal is a fixed function of the context
    (n-gram style: the verifier uses the match rule)."""

    capabilities = DrafterCapabilities()

    def __init__(self, propose_fn: Callable[[tuple[int, ...], int], Sequence[int]], source: str = "ngram"):
        self.propose_fn = propose_fn
        self.source = source

    def behind(self, context) -> int:
        return 0

    def prefill(self, context) -> None:
        pass

    def ready(self, context) -> str:
        return self.source

    def propose(self, context, budget: int, sp: SamplingParams, rng) -> Draft | None:
        tokens = tuple(int(t) for t in self.propose_fn(tuple(context), budget))[:budget]
        return Draft(tokens, None, self.source) if tokens else None


# --- exhaustive randomness ----------------------------------------------------------------
class Enumerator:
    """A `Random` (edge_spec.core.sampling) that, run again and again on deterministic code, takes
    every path of random choices once: depth-first, replaying the recorded choices, then the
    first branch not yet tried. `weight` is the probability of the path just run (the product of
    its branch probabilities; zero-probability branches are never taken)."""

    def __init__(self):
        self._path: list[int] = []                     # branch index taken at each choice point
        self._options: list[tuple[tuple, ...]] = []    # (value, probability) pairs at each point
        self._depth = 0
        self.weight = 1.0

    def _choose(self, options: tuple[tuple, ...]):
        d = self._depth
        if d < len(self._path):
            if self._options[d] != options:
                raise AssertionError(f"the code under enumeration is not deterministic at choice {d}")
        else:
            self._path.append(0)
            self._options.append(options)
        value, prob = options[self._path[d]]
        self.weight *= prob
        self._depth += 1
        return value

    def bernoulli(self, prob: float) -> bool:
        prob = float(prob)
        if not 0.0 <= prob <= 1.0:
            raise AssertionError(f"bernoulli probability {prob} outside [0, 1]")
        return self._choose(tuple((v, w) for v, w in ((True, prob), (False, 1.0 - prob)) if w > 0))

    def categorical(self, p: np.ndarray) -> int:
        p = np.asarray(p, dtype=np.float64)
        if (p < 0).any() or not p.sum() > 0:
            raise AssertionError(f"categorical over an invalid vector {p}")
        p = p / p.sum()  # NumpyRandom.categorical normalises too
        return self._choose(tuple((i, float(w)) for i, w in enumerate(p) if w > 0))

    def _next_path(self) -> bool:
        """Move to the next untried path; False when all have been run."""
        if self._depth != len(self._path):
            raise AssertionError("a replayed run made fewer choices than the recorded path")
        while self._path:
            if self._path[-1] + 1 < len(self._options[-1]):
                self._path[-1] += 1
                return True
            self._path.pop()
            self._options.pop()
        return False

    def _restart(self) -> None:
        self._depth = 0
        self.weight = 1.0


def enumerate_outcomes(fn: Callable[[Enumerator], Hashable], max_paths: int = 200_000) -> dict:
    """{outcome: exact probability} of fn(rng), over every path of its random choices."""
    rng = Enumerator()
    dist: dict = {}
    for _ in range(max_paths):
        rng._restart()
        outcome = fn(rng)
        dist[outcome] = dist.get(outcome, 0.0) + rng.weight
        if not rng._next_path():
            total = sum(dist.values())
            if abs(total - 1.0) > 1e-9:
                raise AssertionError(f"enumerated paths hold probability {total}, not 1")
            return dist
    raise AssertionError(f"more than {max_paths} random paths")


# --- grammars ------------------------------------------------------------------------------------
class FakeMatcher:
    """A grammar over a small vocabulary as a table (the Matcher of edge_spec/core/grammar.py):
    `table[state]` maps each allowed token to the next state; `accepting` states also allow the
    end tokens; `forced[state]` is what the grammar proposes as forced there: legal tokens, not
    necessarily the only way on (as a forced text whose tokenization the target may not take)."""

    def __init__(self, table: dict, accepting: set, end_tokens: set, vocab: int, forced: dict | None = None):
        self.table, self.accepting, self.vocab_size = table, set(accepting), vocab
        self.end_tokens = frozenset(end_tokens)
        self.forced_table = forced or {}
        self.states = [0]
        self.computed = [0]  # masks computed by this matcher and its copies

    def allowed(self, state) -> set[int]:
        out = set(self.table.get(state, {}))
        return out | self.end_tokens if state in self.accepting else out

    @property
    def masks_computed(self) -> int:
        return self.computed[0]

    def mask(self) -> np.ndarray:
        self.computed[0] += 1
        out = np.zeros(self.vocab_size, dtype=bool)
        out[sorted(self.allowed(self.states[-1]))] = True
        return out

    def consume(self, token: int) -> None:
        state = self.states[-1]
        assert token in self.allowed(state), f"token {token} is not allowed in state {state}"
        self.states.append(self.table.get(state, {}).get(token, "end"))

    def forced(self) -> tuple[int, ...]:
        return tuple(self.forced_table.get(self.states[-1], ()))

    def copy(self) -> FakeMatcher:
        other = FakeMatcher(self.table, self.accepting, self.end_tokens, self.vocab_size, self.forced_table)
        other.states, other.computed = list(self.states), self.computed
        return other


def masked_joint(dist_fn: DistFn, matcher: FakeMatcher, prompt: Sequence[int], n: int,
                 transform: Callable[[np.ndarray], np.ndarray]) -> dict[tuple, float]:
    """Exact distribution of (emitted tokens, finish reason) under the masked target: at each
    position p after `transform` of the logits with the grammar's forbidden tokens at -inf; an
    end token stops ("stop", not emitted), as does a state allowing only end tokens; a state
    allowing nothing ends with "no_legal_token"; n tokens with "length"."""
    out: dict[tuple, float] = {}

    def add(key, weight):
        out[key] = out.get(key, 0.0) + weight

    def walk(seq, state, weight):
        if len(seq) == n:
            return add((seq, "length"), weight)
        allowed = matcher.allowed(state)
        if not allowed:
            return add((seq, "no_legal_token"), weight)
        if allowed <= matcher.end_tokens:
            return add((seq, "stop"), weight)
        with np.errstate(divide="ignore"):
            logits = np.log(np.asarray(dist_fn(tuple(prompt) + seq), dtype=np.float64))
        logits[[t for t in range(len(logits)) if t not in allowed]] = -np.inf
        p = transform(logits)
        for x in range(len(p)):
            if p[x] > 0:
                if x in matcher.end_tokens:
                    add((seq, "stop"), weight * p[x])
                else:
                    walk(seq + (x,), matcher.table[state][x], weight * p[x])

    walk((), 0, 1.0)
    return out
