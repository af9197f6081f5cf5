"""What the commands share: the options of every command that loads a model, stated once
(`engine_command`), and how a command runs (one-line errors, progress bars). Light: importing it
loads no model code."""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from pathlib import Path
from typing import List, Optional

import typer

from edge_spec.options import EngineOptions
from edge_spec.types import EdgespecError, SamplingParams

E, S = EngineOptions(), SamplingParams()  # the defaults, read from one place

# --- the options of every command that loads a model: chat, generate, serve, plan and bench ------
ModelArg = typer.Argument(None, metavar="[MODEL.gguf]", help="Target model: a .gguf path or a name from `edgespec models list` (edgespec, Ollama, LM Studio, Hugging Face cache; default: Qwen2.5-Coder-1.5B).", show_default=False)
ModelOpt = typer.Option(None, "-m", "--model", help="Target model (same as the argument).", show_default=False)
DraftOpt = typer.Option(None, "-md", "--draft", help="Draft model (.gguf or a name from `edgespec models list`) with the same tokenizer (default: the plan picks among your models).", show_default=False)
NgramOpt = typer.Option(False, "--ngram", help="Draft by n-gram lookup only (no draft model).")
NoNgramOpt = typer.Option(False, "--no-ngram", help="Do not use n-gram drafts.")
PlainOpt = typer.Option(False, "--plain", help="No speculation: plain decoding with the plan's placement, the baseline.")
CtxOpt = typer.Option(E.memory.n_ctx, "-c", "--ctx-size", help="Context size in tokens.")
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
TreeBudgetOpt = typer.Option(E.drafting.tree_budget, "--tree-budget", metavar="N",
                             help="Draft best-first token trees of up to N nodes with the draft model (SpecExec), "
                                  "n-gram branches merged in, each verified in one target pass; pays when a target "
                                  "pass over many tokens costs about one over a single token (default: the plan's, "
                                  "which drafts trees for a target paged from disk; 0 = off).", show_default=False)
BackendOpt = typer.Option(E.model.backend, "--backend", help="Target backend: llama (llama.cpp), torch, onnx (onnxruntime, "
                          "CPU: the GGUF exported to ONNX on first use; no token trees), or auto: llama.cpp, or torch "
                          "streaming a target too big for the GPU's memory (torch: `pip install edgespec\\[torch]`, onnx: "
                          "`pip install edgespec\\[onnx]`).")
ScheduleOpt = typer.Option(E.drafting.schedule, "--schedule", help="sequential (draft, then verify), parallel (the draft model "
                           "drafts in a thread of its own while the target verifies; on a CPU alone the cores are split) "
                           "or auto: the plan's choice.")
DraftBackendOpt = typer.Option(E.model.draft_backend, "--draft-backend",
                               help="Draft model backend: llama (llama.cpp), torch or onnx (onnxruntime).")

# --- sampling: chat and generate --------------------------------------------------------------
TempOpt = typer.Option(S.temperature, "--temp", help="Temperature (0 = greedy).")
TopKOpt = typer.Option(S.top_k, "--top-k", help="Top-k (0 = off).")
TopPOpt = typer.Option(S.top_p, "--top-p", help="Top-p (1 = off).")
MinPOpt = typer.Option(S.min_p, "--min-p", help="Min-p (0 = off).")
SeedOpt = typer.Option(None, "--seed", help="Random seed.", show_default=False)
NOpt = typer.Option(S.max_tokens, "-n", "--max-tokens", help="Most tokens to generate per reply.")
StopOpt = typer.Option(None, "--stop", help="Stop when this text appears (repeatable).", show_default=False)
StatsOpt = typer.Option("text", "--stats", help="Stats line format on stderr: text, json or none.")

# name -> (type, typer parameter), in the order --help lists them
ENGINE_FLAGS = {
    "model": (Optional[str], ModelArg), "model_opt": (Optional[str], ModelOpt), "draft": (Optional[str], DraftOpt),
    "ngram": (bool, NgramOpt), "no_ngram": (bool, NoNgramOpt), "plain": (bool, PlainOpt), "ctx": (int, CtxOpt),
    "threads": (Optional[int], ThreadsOpt), "threads_draft": (Optional[int], ThreadsDraftOpt),
    "ngl": (Optional[int], NglOpt), "ngld": (Optional[int], NgldOpt), "max_draft": (Optional[int], MaxDraftOpt),
    "draft_length": (Optional[int], DraftLengthOpt), "tree_budget": (Optional[int], TreeBudgetOpt),
    "backend": (str, BackendOpt), "draft_backend": (str, DraftBackendOpt), "schedule": (str, ScheduleOpt),
    "mem_budget": (Optional[str], MemBudgetOpt), "rpc": (Optional[str], RpcOpt),
}
SAMPLING_FLAGS = {
    "temp": (float, TempOpt), "top_k": (int, TopKOpt), "top_p": (float, TopPOpt), "min_p": (float, MinPOpt),
    "seed": (Optional[int], SeedOpt), "n": (int, NOpt), "stop": (Optional[List[str]], StopOpt),
}


def engine_options(model=None, model_opt=None, draft=None, ngram=False, no_ngram=False, plain=False, ctx=E.memory.n_ctx,
                   threads=None, threads_draft=None, ngl=None, ngld=None, max_draft=None, draft_length=None,
                   tree_budget=E.drafting.tree_budget, backend=E.model.backend, draft_backend=E.model.draft_backend,
                   schedule=E.drafting.schedule, mem_budget: str | None = None, rpc: str | None = None) -> EngineOptions:
    """The engine options the shared flags ask for (EngineOptions checks them)."""
    if model and model_opt and model != model_opt:
        raise EdgespecError("give the target once: either MODEL.gguf or -m/--model")
    if ngram and no_ngram:
        raise EdgespecError("--ngram and --no-ngram contradict each other: choose one")
    return EngineOptions.of(
        model=model or model_opt, draft=draft, ngram=not no_ngram, draft_model=not ngram, plain=plain,
        n_ctx=ctx, n_threads=threads, n_threads_draft=threads_draft, n_gpu_layers=ngl,
        n_gpu_layers_draft=ngld, max_draft=max_draft, draft_length=draft_length, backend=backend,
        draft_backend=draft_backend, schedule=schedule, tree_budget=tree_budget, memory_budget=mem_budget,
        rpc=rpc or ())


def cli_flags(options: EngineOptions) -> list[str]:
    """The flags of `edgespec generate` that ask for these options (the defaults left out): how
    `edgespec bench --e2e` starts whole processes that run what it measured in one."""
    m, d, mem = options.model, options.drafting, options.memory
    pairs = [("-m", m.target), ("-md", m.draft), ("-c", mem.n_ctx if mem.n_ctx != E.memory.n_ctx else None),
             ("-t", m.n_threads), ("-td", m.n_threads_draft), ("-ngl", m.n_gpu_layers), ("-ngld", m.n_gpu_layers_draft),
             ("--max-draft", d.max_draft), ("--draft-length", d.draft_length), ("--tree-budget", d.tree_budget),
             ("--backend", m.backend if m.backend != E.model.backend else None),
             ("--draft-backend", m.draft_backend if m.draft_backend != E.model.draft_backend else None),
             ("--schedule", d.schedule if d.schedule != E.drafting.schedule else None),
             ("--mem-budget", mem.budget), ("--rpc", ",".join(m.rpc) or None)]
    flags = [x for flag, value in pairs if value is not None for x in (flag, str(value))]
    return flags + ["--no-ngram"] * (not d.ngram) + ["--ngram"] * (not d.draft_model) + ["--plain"] * d.plain


def sampling_params(temp=S.temperature, top_k=S.top_k, top_p=S.top_p, min_p=S.min_p, seed=None, n=S.max_tokens,
                    stop=None) -> SamplingParams:
    return SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, max_tokens=n,
                          stop=tuple(stop or ()))


def engine_command(fn=None, *, sampling: bool = False):
    """A command that loads a model: `fn(options: EngineOptions, [sp: SamplingParams,] **own)`.
    The shared flags (ENGINE_FLAGS, and SAMPLING_FLAGS with sampling=True) join fn's own in the
    signature typer reads, and arrive built and checked; an EdgespecError anywhere is one line."""
    if fn is None:
        return lambda f: engine_command(f, sampling=sampling)
    own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name not in ("options", "sp")]
    shared = {**ENGINE_FLAGS, **(SAMPLING_FLAGS if sampling else {})}

    @functools.wraps(fn)
    def command(**kwargs):
        flags = {name: kwargs.pop(name) for name in shared}

        def go():
            built = {"options": engine_options(**{k: flags[k] for k in ENGINE_FLAGS})}
            if sampling:
                built["sp"] = sampling_params(**{k: flags[k] for k in SAMPLING_FLAGS})
            fn(**built, **kwargs)

        run(go)

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
        for name, (kind, default) in shared.items()]
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in own} | {name: kind for name, (kind, _) in shared.items()}
    del command.__wrapped__  # typer reads the signature above, not fn's
    return command


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
