"""The `edgespec` command: a thin typer layer over edge_spec.pipeline.engine (heavy imports are lazy;
the options and helpers the commands share are in cli/common.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from edge_spec.types import SamplingParams
from edge_spec.surfaces.cli.common import (
    BackendOpt,
    CtxOpt,
    DraftBackendOpt,
    DraftLengthOpt,
    DraftOpt,
    MaxDraftOpt,
    MemBudgetOpt,
    RpcOpt,
    MinPOpt,
    ModelArg,
    ModelOpt,
    NgldOpt,
    NglOpt,
    NgramOpt,
    NOpt,
    NoNgramOpt,
    PlainOpt,
    ScheduleOpt,
    SeedOpt,
    StatsOpt,
    StopOpt,
    TempOpt,
    ThreadsDraftOpt,
    ThreadsOpt,
    TopKOpt,
    TopPOpt,
    TreeBudgetOpt,
    engine_options,
    read_prompt,
    run,
    stats_format,
)
from edge_spec.surfaces.cli.bench import bench_command
from edge_spec.surfaces.cli.drafter import app as drafter_app
from edge_spec.surfaces.cli.models import app as models_app
from edge_spec.surfaces.cli.plan import plan_command
from edge_spec.surfaces.cli.profile import profile_command
from edge_spec.surfaces.cli.serve import serve_command
from edge_spec.surfaces.cli.worker import worker_command

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
def chat(
    model: Optional[str] = ModelArg, model_opt: Optional[str] = ModelOpt, draft: Optional[str] = DraftOpt,
    ngram: bool = NgramOpt, no_ngram: bool = NoNgramOpt, plain: bool = PlainOpt,
    ctx: int = CtxOpt, threads: Optional[int] = ThreadsOpt, threads_draft: Optional[int] = ThreadsDraftOpt,
    ngl: Optional[int] = NglOpt, ngld: Optional[int] = NgldOpt, max_draft: Optional[int] = MaxDraftOpt,
    draft_length: Optional[int] = DraftLengthOpt, backend: str = BackendOpt, draft_backend: str = DraftBackendOpt,
    schedule: str = ScheduleOpt, mem_budget: Optional[str] = MemBudgetOpt, rpc: Optional[str] = RpcOpt,
    tree_budget: Optional[int] = TreeBudgetOpt, temp: float = TempOpt, top_k: int = TopKOpt, top_p: float = TopPOpt, min_p: float = MinPOpt,
    seed: Optional[int] = SeedOpt, n: int = NOpt, stop: Optional[List[str]] = StopOpt,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt.", show_default=False),
    stats: str = StatsOpt,
) -> None:
    """Chat in the terminal. With no model, the default Qwen2.5-Coder 1.5B; the plan picks the drafters."""
    from edge_spec.surfaces.cli.chat import run_chat

    run(lambda: run_chat(
        engine_options(model, model_opt, draft, ngram, no_ngram, plain, ctx, threads, threads_draft, ngl, ngld, max_draft,
                        draft_length, backend, draft_backend, schedule, mem_budget, tree_budget, rpc),
        SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, max_tokens=n,
                       stop=tuple(stop or ())),
        system, stats_format(stats)))


@app.command()
def generate(
    model: Optional[str] = ModelArg, model_opt: Optional[str] = ModelOpt, draft: Optional[str] = DraftOpt,
    ngram: bool = NgramOpt, no_ngram: bool = NoNgramOpt, plain: bool = PlainOpt,
    prompt: Optional[str] = typer.Option(None, "-p", "--prompt", help="Prompt text.", show_default=False),
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="Read the prompt from a file.", show_default=False),
    raw: bool = typer.Option(False, "--raw", help="Continue the text as is, without the chat template."),
    ctx: int = CtxOpt, threads: Optional[int] = ThreadsOpt, threads_draft: Optional[int] = ThreadsDraftOpt,
    ngl: Optional[int] = NglOpt, ngld: Optional[int] = NgldOpt, max_draft: Optional[int] = MaxDraftOpt,
    draft_length: Optional[int] = DraftLengthOpt, backend: str = BackendOpt, draft_backend: str = DraftBackendOpt,
    schedule: str = ScheduleOpt, mem_budget: Optional[str] = MemBudgetOpt, rpc: Optional[str] = RpcOpt,
    tree_budget: Optional[int] = TreeBudgetOpt, temp: float = TempOpt, top_k: int = TopKOpt, top_p: float = TopPOpt, min_p: float = MinPOpt,
    seed: Optional[int] = SeedOpt, n: int = NOpt, stop: Optional[List[str]] = StopOpt,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (chat template only).", show_default=False),
    stats: str = StatsOpt,
) -> None:
    """Generate one reply to -p TEXT or -f FILE and exit."""
    from edge_spec.surfaces.cli.chat import run_generate

    def go():
        text = read_prompt(prompt, file)
        run_generate(
            engine_options(model, model_opt, draft, ngram, no_ngram, plain, ctx, threads, threads_draft, ngl, ngld, max_draft,
                            draft_length, backend, draft_backend, schedule, mem_budget, tree_budget, rpc),
            SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, max_tokens=n,
                       stop=tuple(stop or ())),
            text, system, raw, stats_format(stats))

    run(go)


def main() -> None:
    app()
