"""Layer-skipping self-drafters vs the 4-bit self-drafter (QuantSpec), both against plain decoding.

1. Builds into --dir, or reuses what is there: the q4_0 self-drafter (`drafter build --method
   quant`; only for a target above 6 bits per weight), the layer-skipping drafter the build
   chooses (`--method skip`, whose table of measured agreement and predicted speed is printed),
   and, for each N in --counts, the 4-bit copy (or the target) without the N layers that build
   ranked least needed.
2. Step cost: one decode step + the argmax over its logits, round-robin over the target and the
   drafters (bench/trim.py's step_costs, same machine moments); median and ratio to the target's
   step (the c of the speculative decoding speed-up formula).
3. End to end on the bench prompts (bench/prompts.py, distinct from the calibration replies):
   plain decoding and speculative decoding with each drafter, interleaved step by step as in
   bench/speculative.py; tokens/s, ratio to plain, accepted / drafted, the per-token acceptance
   alpha = accepted / (accepted + drafts cut short) (each token is compared until the first
   rejection: the estimate to hold against the build's held-out agreement), tokens per target
   pass. Then each drafter's alpha over all prompts. T = 0 throughout.

    .venv/bin/python bench/skip.py -m /tmp/f16/qwen1.5b-f16.gguf
    .venv/bin/python bench/skip.py -m smollm2-135m-instruct-q4_1 --counts 2 --steps 4 -n 16 --prompts chat \
        --probe-tokens 32 --held-out-tokens 64                                                           # smoke
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.prompts import DEFAULT, PROMPTS, named  # noqa: E402
from bench.trim import step_costs  # noqa: E402
from edge_spec.backends.llama_cpp import LlamaCppBackend, LlamaOptions  # noqa: E402
from edge_spec.build.quant import build  # noqa: E402
from edge_spec.build.skip import SkipSettings, write_skipped  # noqa: E402
from edge_spec.core.runtime import Decoding, Runtime  # noqa: E402
from edge_spec.defaults import MIN_SOURCE_BITS  # noqa: E402
from edge_spec.models import registry as models  # noqa: E402
from edge_spec.models.chat_template import chat_tokens  # noqa: E402
from edge_spec.models.provenance import info  # noqa: E402
from edge_spec.pipeline.resolve import resolve_model  # noqa: E402
from edge_spec.plan.costmodel import source_bits  # noqa: E402
from edge_spec.surfaces.benchmark import interleaved, seconds_for  # noqa: E402
from edge_spec.types import SamplingParams  # noqa: E402


def drafters(target: Path, directory: Path, counts: list[int], search: SkipSettings, progress) -> dict[str, Path]:
    """Label -> drafter file, built into `directory` unless already there."""
    found = {}
    base = target
    if source_bits(target) > MIN_SOURCE_BITS:
        base = found["q4_0"] = directory / f"{target.stem}.quant-q4_0.gguf"
        if not base.is_file():
            build(target, "quant", base, progress=progress)
    chosen = directory / f"{target.stem}.skip.gguf"
    if not chosen.is_file():
        build(target, "skip", chosen, progress=progress, search=search)
    built = info(chosen)
    print(f"{chosen.name}: skips {built['skipped_layers']}; measured at build time:")
    for line in built["skip_choice"].split("; "):
        print(f"  {line}")
    found[f"skip {len(built['skipped_layers'])} (chosen)"] = chosen
    alone = dict(pair.split(":") for pair in built["layer_agreement"].split())
    least_needed = sorted(alone, key=lambda layer: (-float(alone[layer]), int(layer)))
    for n in counts:
        layers = sorted(int(layer) for layer in least_needed[:n])
        path = directory / f"{base.stem}.skip-{'-'.join(map(str, layers))}.gguf"
        if not path.is_file():
            write_skipped(base, path, layers, {})
        found[f"skip {n}"] = path
    return found


PLAIN = Decoding(ngram=False)  # no drafter: plain decoding


def speculative(context, drafter, k: int) -> Runtime:
    """A runtime drafting with `drafter` alone, k tokens a step (0: as the controller decides)."""
    drafter.truncate(0)
    return Runtime.from_plan(Decoding(ngram=False, draft_length=k or None), context, drafter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="/tmp/f16/qwen1.5b-f16.gguf", help="the target (F16, BF16 or Q8_0 best)")
    ap.add_argument("--counts", default="2,4,6", help="also the 4-bit copy without this many layers (ranked by the build)")
    ap.add_argument("--steps", type=int, default=48, help="draft steps timed per drafter")
    ap.add_argument("-n", "--max-tokens", type=int, default=128)
    ap.add_argument("--prompts", default=DEFAULT, help="prompt ids and categories (bench/prompts.py)")
    ap.add_argument("-k", "--draft-length", type=int, default=4,
                    help="tokens drafted per step end to end (fixed, so the drafters' costs show; 0 = adaptive)")
    ap.add_argument("--probe-tokens", type=int, default=SkipSettings.probe_tokens,
                    help="the skip build's leave-one-out slice (positions)")
    ap.add_argument("--held-out-tokens", type=int, default=SkipSettings.held_out_tokens,
                    help="the skip build's held-out slice (positions)")
    ap.add_argument("--no-e2e", action="store_true", help="step cost only")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/edgespec-skip"))
    args = ap.parse_args()
    target_path = resolve_model(args.model, models.DEFAULT_TARGET)
    args.dir.mkdir(parents=True, exist_ok=True)
    search = SkipSettings(probe_tokens=args.probe_tokens, held_out_tokens=args.held_out_tokens)
    paths = drafters(target_path, args.dir, [int(n) for n in args.counts.split(",") if n], search,
                     lambda what, fraction: print(f"\r{what} {fraction:4.0%}", end="", file=sys.stderr, flush=True))
    opts = LlamaOptions(n_ctx=2048)
    target = LlamaCppBackend(target_path, opts)
    backends = {label: LlamaCppBackend(path, opts) for label, path in paths.items()}

    prompt = chat_tokens(target, [{"role": "user", "content": PROMPTS["code"]}])
    cost = step_costs({"target": target, **backends}, prompt, args.steps)
    paths["target"] = target_path
    print(f"\ntarget {target_path.name}")
    print("| model | layers | GiB | step ms | step cost vs target |")
    print("|---|---|---|---|---|")
    for label, c in cost.items():
        layers = (backends.get(label) or target).facts.n_layers
        print(f"| {label} | {layers} | {paths[label].stat().st_size / 2**30:.2f} | {c * 1e3:.1f} | "
              f"**{c / cost['target']:.2f}** |")
    if args.no_e2e:
        return

    print("\n| prompt | drafter | tok/s | vs plain | accepted / drafted | alpha | tokens/pass |")
    print("|---|---|---|---|---|---|---|")
    contexts = {label: target.sibling() for label in ["plain", *backends]}
    totals = {label: [0, 0] for label in backends}  # accepted, drafts cut short
    sp = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for name, text in named(args.prompts):
        prompt = chat_tokens(target, [{"role": "user", "content": text}])
        runs = {"plain": Runtime.from_plan(PLAIN, contexts["plain"])} | {
            label: speculative(contexts[label], d, args.draft_length) for label, d in backends.items()}
        result = interleaved(runs, prompt, sp)
        n = min(r["tokens"] for r in result.values())  # T = 0: every run emits the same tokens
        plain_s = seconds_for(result.pop("plain")["trace"], n)
        for label, r in result.items():
            spent = seconds_for(r["trace"], n)
            cut = sum(source["rejected"] for source in r["by_source"].values())
            totals[label][0] += r["accepted"]
            totals[label][1] += cut
            print(f"| {name} | {label} | {n / spent:.2f} | **{plain_s / spent:.2f}** | "
                  f"{r['accepted'] / max(r['drafted'], 1):.3f} | {r['accepted'] / max(r['accepted'] + cut, 1):.3f} | "
                  f"{r['mean_accepted_length']:.2f} |", flush=True)
    print("\n| drafter | alpha over all prompts |\n|---|---|")
    for label, (accepted, cut) in totals.items():
        print(f"| {label} | {accepted / max(accepted + cut, 1):.3f} |")
    for c in contexts.values():
        c.close()


if __name__ == "__main__":
    main()
