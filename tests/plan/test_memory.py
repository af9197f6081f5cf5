"""The memory a plan may use, as the process really has it: RAM, the cgroup's limit (v1 and v2),
or --mem-budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_spec.options import parse_size
from edge_spec.plan.memory import cgroup_limit, memory_budget
from edge_spec.types import EdgespecError

GiB = 2**30


def fake_proc(tmp_path, cgroup: str, mounts: list[str], rss_kib: int = 1000) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "mountinfo").write_text("\n".join(mounts) + "\n")
    (proc / "self" / "status").write_text(f"Name:\tpython\nVmRSS:\t{rss_kib} kB\n")
    return proc


def test_cgroup_v2_limit_is_read_and_the_smallest_ancestor_applies(tmp_path):
    root = tmp_path / "cg2"
    leaf = root / "user.slice" / "app"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text("max\n")                     # no limit of its own
    (leaf / "memory.current").write_text(str(100 << 20))
    (leaf / "memory.stat").write_text(f"anon {60 << 20}\nfile {40 << 20}\n")
    (root / "user.slice" / "memory.max").write_text(str(2 * GiB))  # its parent's applies
    (root / "user.slice" / "memory.current").write_text(str(900 << 20))
    (root / "user.slice" / "memory.stat").write_text(f"file {500 << 20}\n")
    proc = fake_proc(tmp_path, "0::/user.slice/app\n",
                     [f"30 1 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw"], rss_kib=100 << 10)
    limit, others, where = cgroup_limit(proc)
    assert limit == 2 * GiB and "cgroup v2 memory.max" in where and "user.slice" in where
    assert others == (900 << 20) - (500 << 20) - (100 << 20)  # usage less page cache less our own RSS
    budget = memory_budget(available=20 * GiB, proc=proc)
    assert budget.bytes == 2 * GiB - others and budget.source == where
    assert memory_budget(available=GiB, proc=proc).source == "available RAM"  # RAM is the smaller


def test_cgroup_v1_limit_is_read_from_the_memory_hierarchy(tmp_path):
    mem = tmp_path / "cg1" / "memory"
    folder = mem / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "memory.limit_in_bytes").write_text(str(800 << 20))
    (folder / "memory.usage_in_bytes").write_text(str(300 << 20))
    (folder / "memory.stat").write_text(f"cache {250 << 20}\nrss {50 << 20}\ntotal_cache {250 << 20}\n")
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712")  # v1's "no limit"
    proc = fake_proc(tmp_path, "9:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n",
                     [f"40 30 0:33 / {mem} rw - cgroup cgroup rw,memory",
                      f"41 30 0:34 / {tmp_path / 'cg1' / 'pids'} rw - cgroup cgroup rw,pids"], rss_kib=50 << 10)
    limit, others, where = cgroup_limit(proc)
    assert (limit, others) == (800 << 20, 0) and "cgroup v1 memory.limit_in_bytes" in where
    assert memory_budget(available=8 * GiB, proc=proc).bytes == 800 << 20


def test_no_limit_an_unreadable_cgroup_and_an_override(tmp_path):
    mem = tmp_path / "memory"
    mem.mkdir()
    (mem / "memory.limit_in_bytes").write_text("9223372036854771712")
    proc = fake_proc(tmp_path, "4:memory:/\n", [f"40 30 0:33 / {mem} rw - cgroup cgroup rw,memory"])
    assert cgroup_limit(proc) is None
    assert memory_budget(available=3 * GiB, proc=proc).bytes == 3 * GiB
    broken = memory_budget(available=3 * GiB, proc=tmp_path / "nowhere")  # no /proc/self/cgroup
    assert broken.bytes == 3 * GiB and broken.source == "available RAM"
    assert "could not be read" in broken.notes[0] and "available RAM" in broken.notes[0]
    assert memory_budget(override=GiB, available=3 * GiB, proc=proc) .source == "--mem-budget"


@pytest.mark.parametrize("text, value", [("4G", 4 * GiB), ("800M", 800 << 20), ("1.5GiB", 3 * GiB // 2),
                                         ("512k", 512 << 10), ("123", 123), (" 2 gb ", 2 * GiB)])
def test_sizes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "4X", "-1G", "G", "0"])
def test_bad_sizes_say_how_to_write_one(text):
    with pytest.raises(EdgespecError, match="4G|more than 0"):
        parse_size(text)


def test_mem_budget_flag_reaches_the_plan(tmp_path):
    from typer.testing import CliRunner

    from edge_spec.surfaces.cli import app
    from tests.tiny_gguf import write_llama

    model = write_llama(tmp_path / "tiny.gguf")
    result = CliRunner().invoke(app, ["plan", str(model), "--profile", "laptop-cpu", "--mem-budget", "1M", "--json"])
    assert result.exit_code == 1 and "does not fit" in result.output and "read from disk" in result.output
    result = CliRunner().invoke(app, ["plan", str(model), "--mem-budget", "lots"])
    assert result.exit_code == 1 and "write it like 4G" in result.output


def test_file_cache_room_is_the_limit_less_what_cannot_be_reclaimed(tmp_path, monkeypatch):
    import psutil

    from edge_spec.plan.memory import file_cache_room

    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": 20 * GiB})())
    root = tmp_path / "cg2"
    leaf = root / "bench"
    leaf.mkdir(parents=True)
    (leaf / "memory.max").write_text(str(2 * GiB))
    (leaf / "memory.current").write_text(str(1900 << 20))
    # 700 MiB anonymous, 300 MiB of locked file pages, 900 MiB of file pages that can go
    (leaf / "memory.stat").write_text(f"anon {700 << 20}\nfile {1200 << 20}\nactive_file {400 << 20}\n"
                                      f"inactive_file {500 << 20}\nunevictable {300 << 20}\n")
    proc = fake_proc(tmp_path, "0::/bench\n", [f"30 1 0:26 / {root} rw,nosuid - cgroup2 cgroup2 rw"])
    assert file_cache_room(proc) == 2 * GiB - (1900 << 20) + (900 << 20)
    # cgroup v1 names them total_*; a looser parent does not raise it
    mem = tmp_path / "cg1" / "memory"
    folder = mem / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "memory.limit_in_bytes").write_text(str(GiB))
    (folder / "memory.usage_in_bytes").write_text(str(GiB))
    (folder / "memory.stat").write_text(f"total_active_file {100 << 20}\ntotal_inactive_file {200 << 20}\n")
    (mem / "docker" / "memory.limit_in_bytes").write_text(str(8 * GiB))
    (mem / "docker" / "memory.usage_in_bytes").write_text(str(GiB))
    proc1 = fake_proc(tmp_path / "v1", "4:memory:/docker/abc\n", [f"40 30 0:33 / {mem} rw - cgroup cgroup rw,memory"])
    assert file_cache_room(proc1) == 300 << 20
    # no limit: the machine's available memory; an unreadable cgroup file changes nothing
    assert file_cache_room(tmp_path / "nowhere") == 20 * GiB
