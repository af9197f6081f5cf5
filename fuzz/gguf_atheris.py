"""Coverage-guided fuzzing of the GGUF validator (`edge_spec.models.gguf_file.validate`) with atheris.

Every input is written to a file and validated; returning, or raising EdgespecError, are the
expected outcomes. Any other exception, a crash or a timeout is a finding, saved by libFuzzer
as ``crash-*`` / ``timeout-*`` in the working folder. CI runs the hypothesis tests in
tests/test_gguf_validation.py instead; this harness is for longer runs by hand:

    pip install atheris                       # not a test dependency; Python 3.11 wheels exist
    python fuzz/gguf_atheris.py --make-seeds fuzz/corpus
    python fuzz/gguf_atheris.py -max_total_time=600 -timeout=5 fuzz/corpus

Run from the repository root. libFuzzer adds inputs that reach new code to ``fuzz/corpus``;
``-jobs=N -workers=N`` runs N fuzzers at once, and ``python fuzz/gguf_atheris.py crash-<id>``
replays a finding.
"""

from __future__ import annotations

import atexit
import os
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # edge_spec and tests.tiny_gguf, when run as a script


@lru_cache(maxsize=1)
def _scratch() -> str:
    """One file per process that each input overwrites (the validator reads paths)."""
    fd, path = tempfile.mkstemp(prefix="gguf-fuzz-", suffix=".gguf")
    os.close(fd)
    atexit.register(os.unlink, path)
    return path


def TestOneInput(data: bytes) -> None:
    from edge_spec.models.gguf_file import validate
    from edge_spec.types import EdgespecError

    with open(_scratch(), "wb") as f:
        f.write(data)
    try:
        validate(_scratch())
    except EdgespecError:
        pass


def make_seeds(folder: str | os.PathLike) -> list[Path]:
    """Write a few small valid models (and a header-only copy of one) as a seed corpus."""
    from tests.tiny_gguf import MIN_VOCAB, write_llama

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    small = {"vocab_size": MIN_VOCAB, "n_layer": 1, "n_embd": 32, "n_head": 2, "n_head_kv": 1, "n_ff": 32}
    seeds = [
        write_llama(folder / "tiny.gguf", **small),
        write_llama(folder / "tiny-f16-template.gguf", **small, dtype="f16",
                    chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}"),
        write_llama(folder / "tiny-no-bos-eos.gguf", **small, bos=None, eos=None),
    ]
    from edge_spec.models.gguf_file import validate

    header_only = folder / "header-only.gguf"  # the tensor data cut off: mutations stay in the header
    header_only.write_bytes(seeds[0].read_bytes()[:validate(seeds[0]).data_offset])
    return [*seeds, header_only]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        for path in make_seeds(sys.argv[2]):
            print(path, path.stat().st_size, "bytes")
        return
    import atheris

    with atheris.instrument_imports():
        import edge_spec.models.gguf_file  # noqa: F401 - instrumented for coverage feedback
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
