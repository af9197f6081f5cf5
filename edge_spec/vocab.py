"""Can this drafter draft for this target? Token ids must mean the same strings on both sides."""

from __future__ import annotations

from .types import EdgespecError

SIZE_SLACK = 128   # vocabularies padded to a multiple of 64/128 differ only in unused tail ids
FIRST_CHECKED = 5  # ids below this are special tokens that converters number differently


def check_compatible(target, drafter) -> None:
    """Raise EdgespecError naming the first difference between two backends' vocabularies."""
    t, d = target.facts, drafter.facts
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
