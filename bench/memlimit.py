"""Run a command in a memory-limited cgroup, its model files evicted from the page cache first:
how benches and tests reproduce a machine whose RAM is smaller than the model.

    .venv/bin/python bench/memlimit.py 2G --evict MODEL.gguf -- .venv/bin/edgespec generate ...

Needs root (or a delegated cgroup). cgroup v2 where the memory controller is enabled for the
children of our cgroup's parent, else cgroup v1's memory hierarchy. Swap is limited too (v1
memsw, v2 memory.swap.max) so the limit cannot be dodged by swapping.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_spec.options import parse_size  # noqa: E402
from edge_spec.plan.memory import _mounts  # noqa: E402


class Unavailable(RuntimeError):
    """No memory cgroup can be made here (not root, no controller): say why."""


def evict(paths) -> None:
    """Forget the files' pages (clean pages not mapped by anyone are dropped; no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_cgroup(limit: int) -> tuple[Path, str]:
    """A new cgroup limited to `limit` bytes: (its folder, "v1" or "v2")."""
    mounts = _mounts(Path("/proc"))
    name = f"edgespec-{os.getpid()}-{time.monotonic_ns()}"
    errors = []
    v2 = mounts.get("")
    if v2 is not None and "memory" in (v2 / "cgroup.subtree_control").read_text(errors="replace").split() \
            if v2 is not None and (v2 / "cgroup.subtree_control").exists() else False:
        folder = v2 / name
        try:
            folder.mkdir()
            (folder / "memory.max").write_text(str(limit))
            if (folder / "memory.swap.max").exists():
                (folder / "memory.swap.max").write_text("0")
            return folder, "v2"
        except OSError as e:
            errors.append(f"cgroup v2 at {v2}: {e}")
            _remove(folder)
    v1 = mounts.get("memory")
    if v1 is not None:
        folder = v1 / name
        try:
            folder.mkdir()
            (folder / "memory.limit_in_bytes").write_text(str(limit))
            if (folder / "memory.memsw.limit_in_bytes").exists():
                (folder / "memory.memsw.limit_in_bytes").write_text(str(limit))
            return folder, "v1"
        except OSError as e:
            errors.append(f"cgroup v1 at {v1}: {e}")
            _remove(folder)
    raise Unavailable("no memory cgroup could be made here: " + ("; ".join(errors) or "no memory controller mounted"))


def _remove(folder: Path) -> None:
    for _ in range(50):
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)  # the last task is still leaving


def peak_bytes(folder: Path, version: str) -> int | None:
    name = "memory.peak" if version == "v2" else "memory.max_usage_in_bytes"
    try:
        return int((folder / name).read_text())
    except (OSError, ValueError):
        return None


def run(cmd: list[str], limit: int | str, evict_files=(), **popen) -> tuple[subprocess.CompletedProcess, int | None]:
    """Run `cmd` in a fresh cgroup of `limit` bytes after evicting `evict_files`; returns the
    finished process (stdout and stderr captured as text unless told otherwise) and the peak
    memory the cgroup saw."""
    evict(evict_files)
    folder, version = make_cgroup(parse_size(limit))
    procs = str(folder / "cgroup.procs")

    def enter() -> None:  # in the child, before exec: the command and all it starts are limited
        with open(procs, "w") as f:
            f.write(str(os.getpid()))

    popen.setdefault("capture_output", True)
    popen.setdefault("text", True)
    try:
        done = subprocess.run(cmd, preexec_fn=enter, **popen)
        return done, peak_bytes(folder, version)
    finally:
        _remove(folder)


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        sys.exit("usage: memlimit.py LIMIT [--evict FILE]... -- COMMAND...")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("limit", help="memory limit, e.g. 2G or 800M")
    ap.add_argument("--evict", action="append", default=[], help="a file to drop from the page cache first")
    args = ap.parse_args(argv[:cut])
    done, peak = run(argv[cut + 1:], args.limit, args.evict, capture_output=False)
    print(f"memlimit: exit {done.returncode}, peak {peak / 2**20:.0f} MiB" if peak else
          f"memlimit: exit {done.returncode}", file=sys.stderr)
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
