"""What the commands share: the options of chat, generate and serve, and how a command runs
(one-line errors, progress bars). Light: importing it loads no model code."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import typer

from edge_spec.options import EngineOptions
from edge_spec.plan.memory import parse_size
from edge_spec.types import EdgespecError, SamplingParams

E, S = EngineOptions(), SamplingParams()  # the defaults, read from one place

# --- options shared by chat and generate -------------------------------------------------------
ModelArg = typer.Argument(None, metavar="[MODEL.gguf]", help="Target model: a .gguf path or a name from `edgespec models list` (edgespec, Ollama, LM Studio, Hugging Face cache; default: Qwen2.5-Coder-1.5B).", show_default=False)
ModelOpt = typer.Option(None, "-m", "--model", help="Target model (same as the argument).", show_default=False)
DraftOpt = typer.Option(None, "-md", "--draft", help="Draft model (.gguf or a name from `edgespec models list`) with the same tokenizer (default: the plan picks among your models).", show_default=False)
NgramOpt = typer.Option(False, "--ngram", help="Draft by n-gram lookup only (no draft model).")
NoNgramOpt = typer.Option(False, "--no-ngram", help="Do not use n-gram drafts.")
PlainOpt = typer.Option(False, "--plain", help="No speculation: plain decoding, the baseline.")
CtxOpt = typer.Option(E.n_ctx, "-c", "--ctx-size", help="Context size in tokens.")
ThreadsOpt = typer.Option(None, "-t", "--threads", help="Target threads (default: the plan's, physical cores).", show_default=False)
ThreadsDraftOpt = typer.Option(None, "-td", "--threads-draft", help="Drafter threads (default: as -t).", show_default=False)
NglOpt = typer.Option(None, "-ngl", "--gpu-layers", help="Target layers on the GPU, or with --rpc on the workers (default: the plan's).", show_default=False)
NgldOpt = typer.Option(None, "-ngld", "--gpu-layers-draft", help="Drafter layers on the GPU (default: the plan's).", show_default=False)
MemBudgetOpt = typer.Option(None, "--mem-budget", show_default=False,
                            help="Memory the models may use, e.g. 4G or 800M (default: available RAM or the cgroup's "
                                 "limit). A target bigger than this is paged: part pinned in RAM, the rest read from disk.")
RpcOpt = typer.Option(None, "--rpc", metavar="HOST:PORT[,HOST:PORT...]", show_default=False,
                      help="ggml RPC workers (`edgespec worker` on each machine): a target that does not fit here "
                           "puts its last layers on them (the plan's split; -ngl N: N layers there). Workers have "
                           "no authentication: only on loopback or a network you trust.")
MaxDraftOpt = typer.Option(None, "--max-draft", help="Most tokens drafted per step (default: the plan's budget).", show_default=False)
DraftLengthOpt = typer.Option(None, "--draft-length", show_default=False,
                              help="Draft exactly K tokens with the draft model at every step, paying or not (for experiments).")
TreeBudgetOpt = typer.Option(E.tree_budget, "--tree-budget", metavar="N",
                             help="Draft best-first token trees of up to N nodes with the draft model (SpecExec), "
                                  "n-gram branches merged in, each verified in one target pass; pays when a target "
                                  "pass over many tokens costs about one over a single token (default: the plan's, "
                                  "which drafts trees for a target paged from disk; 0 = off).", show_default=False)
TempOpt = typer.Option(S.temperature, "--temp", help="Temperature (0 = greedy).")
TopKOpt = typer.Option(S.top_k, "--top-k", help="Top-k (0 = off).")
TopPOpt = typer.Option(S.top_p, "--top-p", help="Top-p (1 = off).")
MinPOpt = typer.Option(S.min_p, "--min-p", help="Min-p (0 = off).")
SeedOpt = typer.Option(None, "--seed", help="Random seed.", show_default=False)
NOpt = typer.Option(S.max_tokens, "-n", "--max-tokens", help="Most tokens to generate per reply.")
StopOpt = typer.Option(None, "--stop", help="Stop when this text appears (repeatable).", show_default=False)
StatsOpt = typer.Option("text", "--stats", help="Stats line format on stderr: text, json or none.")
BackendOpt = typer.Option(E.backend, "--backend", help="Target backend: llama (llama.cpp), torch, onnx (onnxruntime, "
                          "CPU: the GGUF exported to ONNX on first use; no token trees), or auto: llama.cpp, or torch "
                          "streaming a target too big for the GPU's memory (torch: `pip install edgespec\\[torch]`, onnx: "
                          "`pip install edgespec\\[onnx]`).")
ScheduleOpt = typer.Option(E.schedule, "--schedule", help="sequential (draft, then verify), parallel (the draft model "
                           "drafts in a thread of its own while the target verifies; on a CPU alone the cores are split) "
                           "or auto: the plan's choice.")
DraftBackendOpt = typer.Option(E.draft_backend, "--draft-backend",
                               help="Draft model backend: llama (llama.cpp), torch or onnx (onnxruntime).")


def engine_options(model, model_opt, draft, ngram, no_ngram, plain, ctx, threads, threads_draft, ngl, ngld, max_draft,
                    draft_length=None, backend=E.backend, draft_backend=E.draft_backend, schedule=E.schedule,
                    mem_budget: str | None = None, tree_budget=E.tree_budget, rpc: str | None = None) -> EngineOptions:
    if model and model_opt and model != model_opt:
        raise EdgespecError("give the target once: either MODEL.gguf or -m/--model")
    if ngram and no_ngram:
        raise EdgespecError("--ngram and --no-ngram contradict each other: choose one")
    if ngram and draft:
        raise EdgespecError("--ngram drafts without a model: drop -md/--draft, or drop --ngram to combine both")
    if max_draft is not None and max_draft < 1:
        raise EdgespecError("--max-draft must be >= 1")
    if draft_length is not None and (draft_length < 1 or ngram or plain):
        raise EdgespecError("--draft-length needs K >= 1 and a draft model (not --ngram or --plain)")
    if tree_budget and (ngram or plain):
        raise EdgespecError("--tree-budget grows trees with a draft model: drop --ngram or --plain")
    return EngineOptions(
        model=model or model_opt, draft=draft, ngram=not no_ngram, draft_model=not ngram, plain=plain,
        n_ctx=ctx, n_threads=threads, n_threads_draft=threads_draft, n_gpu_layers=ngl,
        n_gpu_layers_draft=ngld, max_draft=max_draft, draft_length=draft_length, backend=backend,
        draft_backend=draft_backend, schedule=schedule, tree_budget=tree_budget,
        memory_budget=parse_size(mem_budget) if mem_budget is not None else None, rpc=rpc or ())


def stats_format(value: str) -> str:
    if value not in ("text", "json", "none"):
        raise EdgespecError(f"--stats must be text, json or none, not {value!r}")
    return value


def read_prompt(prompt: str | None, file: Path | None) -> str:
    if prompt is not None and file is not None:
        raise EdgespecError("give the prompt once: -p TEXT or -f FILE")
    if file is not None:
        try:
            return file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EdgespecError(f"cannot read the prompt file {file}: {e}") from e
    if prompt is None:
        if sys.stdin.isatty():
            raise EdgespecError("no prompt: give -p TEXT or -f FILE (or pipe text in)")
        return sys.stdin.read()
    return prompt


def run(fn) -> None:
    """Run a command; an EdgespecError becomes one line on stderr and exit code 1."""
    try:
        fn()
    except EdgespecError as e:
        typer.echo(f"edgespec: error: {e}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        raise typer.Exit(130)


def stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def progress_bar():
    """A `report(what, fraction)` drawing one bar per task on stderr (nothing when not a terminal)."""
    console = stderr_console()
    if not console.is_terminal:
        yield lambda what, fraction: None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def report(what: str, fraction: float) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=1.0)
            bar.update(tasks[what], completed=fraction)

        yield report
