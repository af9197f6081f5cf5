"""`edgespec profile`: measure this machine into a hardware profile, or show a saved one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge_spec.backends import rpc as workers
from edge_spec.models import registry as models
from edge_spec.surfaces.cli.common import run
from edge_spec.types import EdgespecError


def profile_command(
    name: Annotated[str, typer.Option("--name", help="Profile name: saved as NAME.json in the profiles folder.")] = "local",
    calibrate: Annotated[str | None, typer.Option(
        "--calibrate", metavar="MODEL.gguf", show_default=False,
        help="Also measure the decode and verify costs of this model (.gguf or known model name).")] = None,
    draft: Annotated[str | None, typer.Option(
        "--draft", metavar="D.gguf", show_default=False, help="Also measure this draft model's costs.")] = None,
    threads: Annotated[int | None, typer.Option(
        "-t", "--threads", show_default=False,
        help="llama.cpp threads for the calibrations (default: physical cores).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the profile as JSON on stdout, and nothing else.")] = False,
    plot: Annotated[Path | None, typer.Option(
        "--plot", metavar="FILE.png", show_default=False,
        help="Draw the calibrated cost curves and the measured speeds (needs matplotlib).")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="FILE", show_default=False,
        help="Save the profile here (default: NAME.json in the profiles folder).")] = None,
    show: Annotated[str | None, typer.Option(
        "--show", metavar="NAME|FILE", show_default=False,
        help="Print a saved or reference profile (e.g. laptop-cpu) instead of measuring.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Shorter measurements, less precise.")] = False,
    rpc: Annotated[str | None, typer.Option(
        "--rpc", metavar="HOST:PORT[,HOST:PORT…]", show_default=False,
        help="Also measure these workers (`edgespec worker`): round trip, transfer throughput, memory, "
             "devices. Printed, not saved in the profile.")] = None,
) -> None:
    """Measure this machine into a hardware profile for the planner (or --show a saved one).

    CPU, memory bandwidth, matmul speed, disk, GPUs, what llama.cpp supports and, with --calibrate,
    what one decode step and one pass over k tokens of a model cost. About 15 s, plus 5-10 s per
    calibrated model on a 2-core machine. With --rpc, the workers too (a second each).
    """
    run(lambda: _profile(name, calibrate, draft, threads, as_json, plot, out, show, quick, rpc))


def _profile(name, calibrate, draft, threads, as_json, plot, out, show, quick, rpc=None) -> None:
    from rich.console import Console

    # profiles are pydantic models: imported when a profile is made or shown, not for --help
    from edge_spec.plan import profile as profiles

    stdout, stderr = Console(), Console(stderr=True)
    pyplot = _pyplot() if plot is not None else None  # a missing matplotlib fails before measuring
    endpoints = workers.parse_endpoints(rpc) if rpc is not None else ()
    saved = None
    if show is not None:
        given = [flag for flag, value in (("--calibrate", calibrate), ("--draft", draft), ("--threads", threads),
                                           ("--out", out), ("--quick", quick), ("--rpc", rpc)) if value]
        if given:
            raise EdgespecError(f"--show prints a saved profile without measuring: drop {', '.join(given)}")
        prof = profiles.load(show)
    else:
        workers.check_workers(endpoints)  # a worker that is down fails before the long measurements
        prof = _measure(name, calibrate, draft, threads, quick, stderr)
        try:
            saved = profiles.save(prof, out)
        except OSError as e:
            raise EdgespecError(f"cannot save the profile to {out or profiles.profiles_dir()}: {e}") from e
    if as_json:
        typer.echo(prof.model_dump_json(indent=2))
    else:
        render(prof, stdout)
    if endpoints:
        render_workers([workers.measure(endpoint) for endpoint in endpoints], stderr if as_json else stdout)
    if saved is not None:
        (stderr if as_json else stdout).print(f"saved to {saved}", highlight=False, soft_wrap=True)
    if pyplot is not None:
        draw(prof, plot, pyplot)
        (stderr if as_json else stdout).print(f"plot written to {plot}", highlight=False, soft_wrap=True)


def _measure(name: str, calibrate, draft, threads, quick: bool, console):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # measuring loads llama.cpp (and torch where a GPU is): imported when a profile is measured
    from edge_spec.plan import hardware

    if not name or Path(name).name != name or name.startswith("."):
        raise EdgespecError(f"--name must be a plain file name, not {name!r}")
    if threads is not None and threads < 1:
        raise EdgespecError("--threads must be >= 1")
    paths = [models.resolve(m) for m in (calibrate, draft) if m is not None]  # fail before measuring
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("measuring", total=1.0)
        return hardware.measure_profile(
            name, paths, threads=threads, quick=quick,
            progress=lambda what, done: bar.update(task, description=f"measuring: {what}", completed=done))


# --- the readable report -----------------------------------------------------------------------
def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _gflops(values: dict[str, float]) -> str:
    return ", ".join(f"{dtype} {v:,.0f} GFLOP/s" for dtype, v in values.items()) or "not measured"


def render(prof, console) -> None:
    """Rich tables for a profile: machine, CPU, memory and disk, GPUs, llama.cpp, calibrations."""
    from rich.markup import escape
    from rich.table import Table

    def facts(title: str, rows: list[tuple[str, str]]) -> Table:
        table = Table(title=title, title_justify="left", show_header=False, min_width=60)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for key, value in rows:
            table.add_row(key, escape(value))
        return table

    c = prof.cpu
    console.print(facts(f"profile {prof.name}", [
        ("kind", prof.kind), ("created", prof.created or "?"), ("os", prof.os or "?"),
        *([("description", prof.description)] if prof.description else []),
    ]))
    console.print(facts("CPU", [
        ("model", c.model), ("arch", c.arch),
        ("cores", f"{c.physical_cores} physical, {c.logical_cores} logical"),
        ("ISA flags", " ".join(c.flags) or "none detected"),
        ("memory bandwidth", f"{c.memory_bandwidth_gbs:.1f} GB/s (STREAM triad, all cores)"),
        ("matmul", _gflops(c.matmul_gflops)),
    ]))
    disk = f"{prof.disk_read_gbs:.2f} GB/s (sequential, page cache dropped)" if prof.disk_read_gbs else "not measured"
    console.print(facts("memory and disk", [
        ("RAM total", _gb(prof.ram_total_bytes)), ("RAM available", _gb(prof.ram_available_bytes)),
        ("disk read", disk),
    ]))
    if prof.gpus:
        table = Table("GPU", "API", "VRAM total", "VRAM free", "bandwidth", "host→device", "matmul",
                      title="GPUs", title_justify="left")
        for i, g in enumerate(prof.gpus):
            unified = " (unified memory)" if g.unified_memory else ""
            table.add_row(f"gpu{i} {escape(g.name)}{unified}", g.api, _gb(g.vram_total_bytes),
                          _gb(g.vram_free_bytes), f"{g.memory_bandwidth_gbs:,.0f} GB/s",
                          f"{g.host_to_device_gbs:.1f} GB/s", _gflops(g.matmul_gflops))
        console.print(table)
    else:
        console.print("[bold]GPUs:[/] none")
    if prof.llama_cpp:
        info = prof.llama_cpp
        console.print(facts("llama.cpp", [(str(k).replace("_", " "), {True: "yes", False: "no"}.get(v, str(v)))
                                          for k, v in info.items()]))
    if prof.calibrations:
        table = Table("k", title="calibrations: seconds of one pass over k tokens (× one decode step)",
                      title_justify="left")
        for cal in prof.calibrations:
            device = cal.device + (f", {cal.n_gpu_layers} GPU layers" if cal.n_gpu_layers else "")
            table.add_column(f"{escape(cal.model)}\n{device}, {cal.threads} threads", justify="right", overflow="fold")
        table.add_row("1 (step)", *(f"{cal.step_seconds * 1e3:.0f} ms" for cal in prof.calibrations))
        for k in sorted({k for cal in prof.calibrations for k in cal.verify_seconds}):
            table.add_row(str(k), *(f"{cal.verify_seconds[k] * 1e3:.0f} ms ×{cal.verify_seconds[k] / cal.step_seconds:.1f}"
                                    if k in cal.verify_seconds else "" for cal in prof.calibrations))
        console.print(table)
    if prof.sources:
        console.print("[bold]sources and notes[/]")
        for source in prof.sources:
            console.print(f"  - {escape(source)}", highlight=False)


def render_workers(infos, console) -> None:
    """A table of measured workers (backends.rpc.WorkerInfo): what a target pass split onto each
    would pay in network time, and the memory it could hold."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="RPC workers", title_justify="left")
    table.add_column("worker", no_wrap=True)
    for column in ("rpc", "round trip", "transfer", "memory free/total"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("devices", overflow="fold")
    for w in infos:
        speed = f"{w.throughput_bps / 1e9:.2f} GB/s" if w.throughput_bps else "not measured"
        rtt = f"{w.rtt_seconds * 1e3:.1f} ms" if w.rtt_seconds >= 1e-3 else f"{w.rtt_seconds * 1e6:.0f} µs"
        devices = ", ".join(d.name for d in w.devices if d.name) or str(len(w.devices))
        table.add_row(escape(w.endpoint), f"v{w.version}", rtt, speed,
                      f"{w.free_bytes / 1e9:.1f}/{_gb(w.total_bytes)}", escape(devices))
    console.print(table)


# --- the picture -------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise EdgespecError(f"--plot needs matplotlib ({e}): pip install matplotlib") from e
    return plt


def draw(prof, path: Path, plt) -> None:
    """A PNG of the calibrated cost curves (seconds per pass vs k, one line per model and device,
    dashed: k plain decode steps) with the measured bandwidth and GFLOP/s as text; `plt` is
    matplotlib.pyplot."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for cal in prof.calibrations:
        points = sorted({1: cal.step_seconds, **cal.verify_seconds}.items())
        ks, secs = [k for k, _ in points], [s for _, s in points]
        (line,) = ax.plot(ks, secs, marker="o", label=f"{cal.model} ({cal.device}, {cal.threads} threads)")
        ax.plot(ks, [k * cal.step_seconds for k in ks], linestyle="--", color=line.get_color(), alpha=0.4)
    if prof.calibrations:
        ks = sorted({1, *(k for cal in prof.calibrations for k in cal.verify_seconds)})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_yscale("log")
        ax.legend(loc="lower right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no calibrations: run edgespec profile --calibrate MODEL.gguf",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("k (tokens in one pass)")
    ax.set_ylabel("seconds per pass (dashed: k decode steps)")
    ax.set_title(f"edgespec profile {prof.name}")
    c = prof.cpu
    lines = [c.model, f"{c.physical_cores} cores, triad {c.memory_bandwidth_gbs:.1f} GB/s, {_gflops(c.matmul_gflops)}"]
    lines += [f"{g.name}: {g.memory_bandwidth_gbs:,.0f} GB/s, {_gflops(g.matmul_gflops)}" for g in prof.gpus]
    ax.text(0.02, 0.98, "\n".join(lines), transform=ax.transAxes, va="top", fontsize="small",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise EdgespecError(f"cannot write the plot to {path}: {e}") from e
    finally:
        plt.close(fig)
