"""Make edge_spec/data/calibration.json: the default target's own replies to the shipped prompts.

`edgespec drafter build --method trim` counts which tokens the *target* produces (VocabTrim); it
reads the target's next-token distributions along these replies, which is fast (one batched pass
per reply) where generating them at build time would take minutes. Run once; the output ships. Prompts that already have a reply in calibration.json keep it, so
adding prompts to calibration_prompts.json and running again only generates the new ones.

    .venv/bin/python scripts/make_calibration.py [-n 112] [--temp 0.7] [--seed 1] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edge_spec  # noqa: E402
from edge_spec.models.registry import DEFAULT_TARGET  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "edge_spec" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=112, help="tokens per reply")
    ap.add_argument("--temp", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="generate every reply again")
    args = ap.parse_args()
    prompts = json.loads((DATA / "calibration_prompts.json").read_text())
    out = {"generated_by": DEFAULT_TARGET, "temperature": args.temp, "max_tokens": args.n, "items": []}
    path = DATA / "calibration.json"
    if path.is_file() and not args.fresh:
        old = json.loads(path.read_text())
        if (old["generated_by"], old["temperature"], old["max_tokens"]) != (DEFAULT_TARGET, args.temp, args.n):
            sys.exit(f"{path} was made with other settings: run with --fresh, or with those settings")
        done = {item["prompt"]: item for item in old["items"]}
        out["items"] = [done[p] for p in prompts if p in done]
        prompts = [p for p in prompts if p not in done]
    total = len(out["items"]) + len(prompts)
    with edge_spec.load(ngram=True) as session:
        for i, prompt in enumerate(prompts, start=len(out["items"])):
            reply = session.generate([{"role": "user", "content": prompt}], temperature=args.temp,
                                     seed=args.seed + i, max_tokens=args.n)
            out["items"].append({"prompt": prompt, "reply": reply.text})
            print(f"{i + 1}/{total} {len(reply.text)} chars", file=sys.stderr, flush=True)
            # written after every reply, so that an interrupted run leaves what it made
            path.write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
