"""How far batched verification moves a target's logits from one-token decoding's: the noise
that lets greedy speculation pick the other token where plain decoding's top two nearly tie
(benchmark.NEAR_TIE is set from this).

For each prompt: plain greedy decoding of --tokens tokens one at a time, keeping every logit row;
then the same positions evaluated in batches of each --sizes, as verification does. Prints, per
batch size, the largest |batched - single| logit over all positions and vocabulary, and the
smallest top-2 margins plain decoding met.

    .venv/bin/python bench/greedy.py [-m MODEL] [--prompts ...] [--tokens 32] [--sizes 2,3,4,8,17]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.prompts import DEFAULT, named  # noqa: E402
from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions  # noqa: E402
from edge_spec.models import registry  # noqa: E402
from edge_spec.models.chat_template import chat_tokens, renderer_for  # noqa: E402
from edge_spec.pipeline.resolve import resolve_model  # noqa: E402


def moves(backend, prompt: list[int], n: int, sizes: list[int]) -> tuple[dict[int, float], list[float]]:
    """({batch size: largest |batched - single| logit}, plain decoding's top-2 margins)."""
    backend.truncate(0)
    backend.forward(prompt[:-1], logits="none")
    seq, single = [prompt[-1]], []
    for _ in range(n):
        row = backend.forward([seq[-1]], logits="last")[-1]
        single.append(row.copy())
        seq.append(int(row.argmax()))
    base, worst = len(prompt) - 1, {}
    for k in sizes:
        for start in range(0, n - k + 1, max(k // 2, 1)):
            backend.truncate(base + start)
            rows = backend.forward(seq[start:start + k], logits="all")
            worst[k] = max(worst.get(k, 0.0), float(np.abs(rows - np.stack(single[start:start + k])).max()))
    top = np.sort(np.stack(single), axis=1)
    return worst, (top[:, -1] - top[:, -2]).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("--prompts", default=DEFAULT)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--sizes", default="2,3,4,8,17")
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with LlamaCppBackend(resolve_model(args.model, registry.DEFAULT_TARGET),
                         LlamaOptions(n_ctx=4096, n_threads=args.threads)) as backend:
        templates = renderer_for(backend)
        worst, margins = {}, []
        for name, text in named(args.prompts):
            found, m = moves(backend, chat_tokens(backend, [{"role": "user", "content": text}], templates),
                             args.tokens, sizes)
            for k, d in found.items():
                worst[k] = max(worst.get(k, 0.0), d)
            margins += m
            print(f"{name:<16} " + "  ".join(f"k={k}: {d:.3f}" for k, d in found.items()), flush=True)
        templates.close()
    print("largest move by batch size: " + ", ".join(f"{k}: {d:.3f}" for k, d in worst.items()))
    print(f"a flip needs a top-2 margin below {2 * max(worst.values()):.3f} logits; plain decoding met "
          f"{sum(m < 2 * max(worst.values()) for m in margins)} of {len(margins)} positions below it "
          f"(smallest margins {', '.join(f'{m:.3f}' for m in sorted(margins)[:4])})")


if __name__ == "__main__":
    main()
