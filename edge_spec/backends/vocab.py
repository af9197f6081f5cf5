"""Can this drafter draft for this target? Token ids must mean the same strings on both sides."""

from __future__ import annotations

from edge_spec.models.gguf_facts import FIRST_CHECKED, SIZE_SLACK
from edge_spec.types import EdgespecError


def check_compatible(target, drafter) -> None:
    """Raise EdgespecError naming the first difference between two backends' vocabularies."""
    t, d = target.facts, drafter.facts
    kept = getattr(drafter, "kept", None)
    if kept is not None:  # a trimmed drafter: row i must be the target's token kept[i]
        for i, tid in enumerate(kept):
            if not 0 <= tid < t.vocab_size or target.token_text(int(tid)) != drafter.token_text(i):
                raise EdgespecError(
                    f"trimmed drafter {d.name} cannot draft for target {t.name}: its token {i} should be the "
                    f"target's token {int(tid)}, which is not the same string. Trim a drafter for this target "
                    "(edgespec drafter build --method trim --target TARGET)")
        return
    problems = []
    if t.vocab_type != d.vocab_type:
        problems.append(f"vocabulary type {t.vocab_type} vs {d.vocab_type}")
    if t.bos != d.bos or t.eos != d.eos:
        problems.append(f"BOS/EOS ids {t.bos}/{t.eos} vs {d.bos}/{d.eos}")
    if abs(t.vocab_size - d.vocab_size) > SIZE_SLACK:
        problems.append(f"vocabulary sizes {t.vocab_size} vs {d.vocab_size} (more than {SIZE_SLACK} apart)")
    if not problems:
        for i in range(FIRST_CHECKED, min(t.vocab_size, d.vocab_size)):
            a, b = target.token_text(i), drafter.token_text(i)
            if a != b:
                problems.append(f"token {i} is {a!r} in the target but {b!r} in the drafter")
                break
    if problems:
        raise EdgespecError(
            f"drafter {d.name} cannot draft for target {t.name}: {'; '.join(problems)}. "
            "Use a drafter from the same model family (same tokenizer), or --ngram, which needs no drafter model")
