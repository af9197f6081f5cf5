"""The `edgespec` command: a thin typer layer over the engine (heavy imports are lazy; the options
of every command that loads a model are stated once, in cli/common.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edge_spec.options import EngineOptions
from edge_spec.surfaces.cli.bench import bench_command
from edge_spec.surfaces.cli.common import StatsOpt, engine_command, read_prompt, stats_format
from edge_spec.surfaces.cli.drafter import app as drafter_app
from edge_spec.surfaces.cli.models import app as models_app
from edge_spec.surfaces.cli.plan import plan_command
from edge_spec.surfaces.cli.profile import profile_command
from edge_spec.surfaces.cli.serve import serve_command
from edge_spec.surfaces.cli.worker import worker_command
from edge_spec.types import SamplingParams

app = typer.Typer(
    help="Lossless speculative decoding for local LLMs. Run `edgespec chat` to talk to the default models.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(models_app, name="models")
app.add_typer(drafter_app, name="drafter")
app.command("plan")(plan_command)
app.command("profile")(profile_command)
app.command("serve")(serve_command)
app.command("bench")(bench_command)
app.command("worker")(worker_command)


@app.command()
@engine_command(sampling=True)
def chat(
    options: EngineOptions, sp: SamplingParams,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt.", show_default=False),
    stats: str = StatsOpt,
) -> None:
    """Chat in the terminal. With no model, the default Qwen2.5-Coder 1.5B; the plan picks the drafters."""
    # the chat loop pulls in the engine: imported when a chat starts, so `--help` stays light
    from edge_spec.surfaces.cli.chat import run_chat

    run_chat(options, sp, system, stats_format(stats))


@app.command()
@engine_command(sampling=True)
def generate(
    options: EngineOptions, sp: SamplingParams,
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="Prompt text.", show_default=False),
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="Read the prompt from a file.", show_default=False),
    raw: bool = typer.Option(False, "--raw", help="Continue the text as is, without the chat template."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (chat template only).", show_default=False),
    stats: str = StatsOpt,
) -> None:
    """Generate one reply to -p TEXT or -f FILE and exit."""
    # as in chat: the engine is imported when it runs
    from edge_spec.surfaces.cli.chat import run_generate

    run_generate(options, sp, read_prompt(prompt, file), system, raw, stats_format(stats))


def main() -> None:
    app()
