"""How much memory this process may really use: RAM available, the cgroup's limit, or the user's
--mem-budget, whichever is given or smallest.

psutil sees the machine's RAM; a container (Docker, systemd slices, Kubernetes) or a cgroup set
up by hand may allow far less, and a plan that ignores it gets the process killed or pages its
weights from disk without knowing. Read here: cgroup v2 `memory.max` and cgroup v1
`memory.limit_in_bytes` of this process's cgroup and every ancestor (the smallest applies), less
what other processes in it hold (its usage less its page cache, which is reclaimable, less our
own resident memory, which the planner counts apart).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

UNLIMITED = 1 << 60   # cgroup v1 writes "no limit" as ~2^63 rounded to a page



@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str            # what set it: "available RAM", "cgroup v2 memory.max (/path)", "--mem-budget"
    notes: tuple[str, ...] = ()


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: Path) -> dict[str, int]:
    try:
        return {k: int(v) for k, v in (line.split()[:2] for line in path.read_text().splitlines() if line.strip())}
    except (OSError, ValueError):
        return {}


def _mounts(proc: Path) -> dict[str, Path]:
    """cgroup mount points by controller ("" for the v2 unified hierarchy), from mountinfo."""
    out: dict[str, Path] = {}
    try:
        lines = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or not tail:
            continue
        if tail[0] == "cgroup2":
            out.setdefault("", Path(fields[4]))
        elif tail[0] == "cgroup" and len(tail) >= 3:
            for option in tail[2].split(","):
                if option == "memory":
                    out["memory"] = Path(fields[4])
    return out


def _candidates(mount: Path, rel: str) -> list[Path]:
    """The cgroup's folder and its ancestors up to the mount (a namespaced path that does not
    exist under the mount is read from the mount's root)."""
    folder = mount / rel.lstrip("/")
    if not folder.is_dir():
        folder = mount
    out = [folder]
    while folder != mount and folder.parent != folder:
        folder = folder.parent
        out.append(folder)
    return out


def _limited(proc: Path):
    """(limit, usage, memory.stat, cgroup version, label) of each folder of this process's cgroups,
    and their ancestors, that has a memory limit. Raises OSError when /proc/self/cgroup cannot be read."""
    lines = (proc / "self" / "cgroup").read_text().splitlines()
    mounts = _mounts(proc)
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        if controllers == "" and "" in mounts:            # cgroup v2
            limit_file, usage_file, version, label = "memory.max", "memory.current", "v2", "cgroup v2 memory.max"
            mount = mounts[""]
        elif "memory" in controllers.split(",") and "memory" in mounts:  # cgroup v1
            limit_file, usage_file, version, label = ("memory.limit_in_bytes", "memory.usage_in_bytes", "v1",
                                                      "cgroup v1 memory.limit_in_bytes")
            mount = mounts["memory"]
        else:
            continue
        for folder in _candidates(mount, rel):
            limit = _read_int(folder / limit_file)
            if limit is None or limit >= UNLIMITED:
                continue
            usage = _read_int(folder / usage_file) or 0
            yield limit, usage, _stat(folder / "memory.stat"), version, f"{label} ({folder})"


def cgroup_limit(proc: str | os.PathLike = "/proc") -> tuple[int, int, str] | None:
    """(limit, bytes others in the cgroup hold, where it was read) for this process, or None
    without a memory limit. Raises OSError when /proc/self/cgroup cannot be read."""
    proc = Path(proc)
    best: tuple[int, int, str] | None = None
    for limit, usage, stat, version, label in _limited(proc):
        cache = stat.get("file" if version == "v2" else "total_cache", stat.get("cache", 0))
        others = max(0, usage - cache - _own_rss(proc))
        if best is None or limit - others < best[0] - best[1]:
            best = (limit, others, label)
    return best


def file_cache_room(proc: str | os.PathLike = "/proc") -> int:
    """Bytes of file pages this process's cgroup could hold in the page cache now: its limit less
    what cannot be reclaimed (anonymous memory, locked pages, the kernel's), the tightest cgroup up
    the hierarchy; without a limit, the machine's available memory. A paged target's Pager reads
    ahead at most a share of it (backends/paging.py)."""
    import psutil

    room = psutil.virtual_memory().available
    try:
        for limit, usage, stat, version, _ in _limited(Path(proc)):
            prefix = "" if version == "v2" else "total_"
            reclaimable = stat.get(f"{prefix}active_file", 0) + stat.get(f"{prefix}inactive_file", 0)
            room = min(room, max(limit - usage + reclaimable, 0))
    except OSError:
        pass
    return room


def _own_rss(proc: Path) -> int:
    try:
        for line in (proc / "self" / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_budget(override: int | None = None, available: int | None = None,
                  proc: str | os.PathLike = "/proc") -> Budget:
    """The memory a plan may use on this machine: `override` (--mem-budget) when given, else the
    smaller of available RAM and the cgroup's limit less what others in it hold."""
    if override is not None:
        return Budget(override, "--mem-budget")
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    try:
        found = cgroup_limit(proc)
    except OSError as e:
        return Budget(available, "available RAM",
                      (f"the cgroup memory limit could not be read ({e.strerror or e}): planning with available RAM",))
    if found is None or found[0] - found[1] >= available:
        return Budget(available, "available RAM")
    limit, others, where = found
    return Budget(limit - others, where)
