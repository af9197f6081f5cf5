"""The benchmarks' prompts: the package's prompt set (edge_spec/data/prompts.jsonl, see
edge_spec/data/PROMPTS.md): Spec-Bench's questions by category and the three prompts the
benchmarks used first (category "fixed": chat, code writing, editing a given file).

--prompts takes ids and categories, comma-separated: `chat,code,edit` or `fixed` (the old set),
`coding,rag`, `specbench-81`. The default, DEFAULT, is the first prompt of every category.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_spec.surfaces.benchmark import Settings, load_prompts, pick, select  # noqa: E402

ALL = load_prompts()
PROMPTS = {p.id: p.text for p in ALL if p.category == "fixed"}  # chat, code, edit
DEFAULT = ",".join(p.id for p in select(ALL, Settings(per_category=1)))


def named(names: str) -> list[tuple[str, str]]:
    """(id, text) of the prompts named by ids and categories."""
    return [(p.id, p.text) for p in pick(ALL, names)]
