"""Mutation check of the lossless tests: apply each plausible lossy bug, one at a time, to a
temporary copy of the package, run the fast exact tests against it, and report killed/survived.
The real tree is never modified.

    .venv/bin/python bench/mutations.py            # all mutations
    .venv/bin/python bench/mutations.py -k top-p   # those whose name contains "top-p"

A mutation is killed when the tests fail on it. One that no longer applies (its source line
changed) is reported as "stale": update its `old` text.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/core/test_sampling.py", "tests/core/test_verify_exact.py", "tests/core/test_tree_exact.py",
         "tests/core/test_parallel.py", "tests/core/test_trim_exact.py", "tests/core/test_spectree_exact.py"]
DESELECT = "not real"

# (name, file, old, new): each a plausible lossy bug
MUTATIONS = [
    # sampling.probs
    ("min-p absolute, not relative to the max", "core/sampling.py", "keep &= p >= sp.min_p * p.max()", "keep &= p >= sp.min_p"),
    ("temperature before top-p/min-p", "core/sampling.py", "p = _softmax(sub, keep, 1.0)\n    if sp.top_p",
     "p = _softmax(sub, keep, sp.temperature)\n    if sp.top_p"),
    ("top-p keeps one token too few", "core/sampling.py", "n_keep = int(np.searchsorted(cum, top_p * (1 - 1e-12))) + 1",
     "n_keep = max(int(np.searchsorted(cum, top_p * (1 - 1e-12))), 1)"),
    ("top-p keeps one token too many", "core/sampling.py", "n_keep = int(np.searchsorted(cum, top_p * (1 - 1e-12))) + 1",
     "n_keep = int(np.searchsorted(cum, top_p * (1 - 1e-12))) + 2"),
    ("top-p ignored", "core/sampling.py", "keep &= _top_p_mask(p, sp.top_p)", "pass"),
    ("min-p ignored", "core/sampling.py", "keep &= p >= sp.min_p * p.max()", "pass"),
    ("top-k keeps k - 1", "core/sampling.py", "idx = _top_k(logits, sp.top_k)", "idx = _top_k(logits, max(sp.top_k - 1, 1))"),
    ("temperature ignored", "core/sampling.py", "out[idx] = _softmax(sub, keep, sp.temperature)",
     "out[idx] = _softmax(sub, keep, 1.0)"),
    ("temperature squared", "core/sampling.py", "out[idx] = _softmax(sub, keep, sp.temperature)",
     "out[idx] = _softmax(sub, keep, sp.temperature ** 2)"),
    ("top-p without the fallback past the candidate cap", "core/sampling.py",
     "if p[cand].sum() < top_p:", "if False:"),
    # NumpyRandom
    ("bernoulli biased x1.04", "core/sampling.py", "return bool(self._rng.random() < prob)",
     "return bool(self._rng.random() < prob * 1.04)"),
    ("bernoulli <=", "core/sampling.py", "return bool(self._rng.random() < prob)", "return bool(self._rng.random() <= prob)"),
    ("categorical side=left", "core/sampling.py", 'side="right"', 'side="left"'),
    ("categorical over the whole vocabulary", "core/sampling.py", "support = np.flatnonzero(p > 0)",
     "support = np.arange(p.shape[0])"),
    ("categorical uniform not scaled by the total", "core/sampling.py", "self._rng.random() * cdf[-1]",
     "self._rng.random()"),
    # chain verification
    ("accept with p/q uncapped at 1 and q(x) > 0 unchecked", "core/verify.py",
     "if q_x > 0 and rng.bernoulli(min(1.0, p[x] / q_x)):", "if rng.bernoulli(min(1.0, p[x] / max(q_x, 1e-300))):"),
    ("accept with q/p", "core/verify.py", "rng.bernoulli(min(1.0, p[x] / q_x))", "rng.bernoulli(min(1.0, q_x / max(p[x], 1e-300)))"),
    ("residual from p", "core/verify.py", "return Verdict(i, rng.categorical(residual(p, q[i], x)))",
     "return Verdict(i, rng.categorical(p))"),
    ("residual q - p", "core/verify.py", "r = np.maximum(p - q, 0.0)", "r = np.maximum(q - p, 0.0)"),
    ("bonus from the last draft row", "core/verify.py", "return Verdict(len(tokens), rng.categorical(p_row(len(tokens))))",
     "return Verdict(len(tokens), rng.categorical(p_row(max(len(tokens) - 1, 0))))"),
    ("match rule: fresh draw after a mismatch", "core/verify.py", "            return Verdict(i, t)\n",
     "            return Verdict(i, rng.categorical(p))\n"),
    # trees
    ("tree step ignores top-k/top-p/min-p on the target side", "core/runtime.py",
     "verify_tree(tree, lambda node: probs(logits[node + 1], sp), rng",
     "verify_tree(tree, lambda node: probs(logits[node + 1], sp.with_(top_k=0, top_p=1.0, min_p=0.0)), rng"),
    ("tree: no residual between sampled children", "core/tree.py", "                r = _residual(r, q)\n", "\n"),
    ("tree: residual from p, not from r", "core/tree.py", "r = _residual(r, q)", "r = _residual(p, q)"),
    ("tree: deterministic children walked by RRS", "core/tree.py", "elif tree.sampled and kids:", "elif kids:"),
    # drafting
    ("drafter q without the sampling transform", "core/drafters/model.py", "        q = probs(logits, sp)\n        return",
     "        q = probs(logits, sp.with_(top_k=0, top_p=1.0, min_p=0.0))\n        return"),
    # drafting ahead
    ("ahead: buffer kept when the context did not come true", "core/drafters/ahead.py",
     "if b <= n <= seq_len and list(context[:b]) == self._base and list(context[b:]) == self._tokens()[: n - b]:",
     "if b <= n <= seq_len:"),
    ("ahead: q rows one off", "core/drafters/ahead.py", "qs = None if self.sp.greedy else np.stack([q for _, q in taken])",
     "qs = None if self.sp.greedy else np.stack([q for _, q in (taken[1:] + taken[:1])])"),
    ("ahead: worker shares the target's generator", "core/runtime.py",
     "return AheadDrafter(drafter, sp, NumpyRandom(None if sp.seed is None else sp.seed + 1))",
     "return AheadDrafter(drafter, sp, rng)"),
]


def run(mutation, timeout: float) -> str:
    name, rel, old, new = mutation
    with tempfile.TemporaryDirectory(prefix="edgespec-mutant-") as tmp:
        copy = Path(tmp)
        shutil.copytree(ROOT / "edge_spec", copy / "edge_spec")
        shutil.copytree(ROOT / "tests", copy / "tests")
        target = copy / "edge_spec" / rel
        source = target.read_text()
        if source.count(old) < 1:
            return "stale"
        target.write_text(source.replace(old, new, 1))
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", DESELECT, *TESTS]
        env = {"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "NO_COLOR": "1"}
        try:
            r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed (timeout)"
        return "survived" if r.returncode == 0 else "killed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="only mutations whose name contains this")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutation")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.k in m[0]]
    results = []
    for m in chosen:
        t0 = time.monotonic()
        outcome = run(m, args.timeout)
        results.append((m[0], outcome))
        print(f"{outcome:17s} {time.monotonic() - t0:6.0f} s  {m[0]}", flush=True)
    killed = sum(o.startswith("killed") for _, o in results)
    print(f"\n{killed} of {len(results)} killed; survived: {[n for n, o in results if o == 'survived'] or 'none'}")


if __name__ == "__main__":
    main()
