"""How long a drafter takes to grow a best-first tree (core/drafters/spectree.py): kept in its cache
as it grows (extend_tree: each node evaluated once) vs evaluated again from the root at each pass
(forward_tree over the new nodes' paths), interleaved in one process, on Spec-Bench prompts.

    .venv/bin/python bench/tree_growth.py [-md DRAFT.gguf] [--budgets 16,32,64] [--per-category 1] [--temp 0.8]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions
from edge_spec.core.drafters import ModelDrafter
from edge_spec.core.drafters.spectree import grow
from edge_spec.models import registry as models
from edge_spec.models.chat_template import chat_tokens, renderer_for
from edge_spec.surfaces.benchmark import Settings, load_prompts, select
from edge_spec.types import SamplingParams


class FromTheRoot:
    """A drafter backend seen without capabilities.tree_growth, so that trees are evaluated from
    the root at each pass (_TreePasses): the reference extend_tree is tested and benched against."""

    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)

    @property
    def capabilities(self):
        return dataclasses.replace(self._backend.capabilities, tree_growth=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-md", "--draft", default=None, help="drafter (default: the default drafter)")
    ap.add_argument("--budgets", default="16,32,64")
    ap.add_argument("--per-category", type=int, default=1)
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("-t", "--threads", type=int, default=None)
    args = ap.parse_args()
    path = args.draft or str(models.require(models.DEFAULT_DRAFT))
    budgets = [int(b) for b in args.budgets.split(",")]
    sp = SamplingParams(temperature=args.temp, top_k=40)
    backend = LlamaCppBackend(path, LlamaOptions(n_ctx=2048, n_seq_max=max(budgets) + 1, n_threads=args.threads))
    renderer = renderer_for(backend)
    prompts = select(load_prompts(), Settings(per_category=args.per_category, max_prompt_chars=2000))
    print(f"drafter {backend.facts.name}, {len(prompts)} prompts, T={args.temp}")
    print("| budget | grown in the cache (s) | from the root (s) | ratio | nodes |")
    print("|---|---|---|---|---|")
    try:
        for budget in budgets:
            kept, again, nodes = [], [], []
            for prompt in prompts:
                context = chat_tokens(backend, [{"role": "user", "content": prompt.text}], renderer)[:1024]
                for drafter, out in ((ModelDrafter(backend), kept), (ModelDrafter(FromTheRoot(backend)), again)):
                    backend.truncate(0)
                    backend.forward(context[:-1], logits="none")  # what the runtime holds before a step
                    t0 = time.perf_counter()
                    tree = grow(drafter, context, budget, sp)
                    out.append(time.perf_counter() - t0)
                nodes.append(len(tree) if tree else 0)
            a, b = statistics.median(kept), statistics.median(again)
            print(f"| {budget} | {a:.3f} | {b:.3f} | **{b / a:.2f}x** | {statistics.mean(nodes):.0f} |")
    finally:
        renderer.close()
        backend.close()
    print(f"\nreproduce: .venv/bin/python bench/tree_growth.py --budgets {args.budgets} "
          f"--per-category {args.per_category} --temp {args.temp}")


if __name__ == "__main__":
    main()
