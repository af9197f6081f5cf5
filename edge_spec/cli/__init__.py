"""The `edgespec` command: a thin typer layer over edge_spec.engine (heavy imports are lazy)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from ..engine import EngineOptions
from ..types import EdgespecError, SamplingParams
from .bench import bench_command
from .drafter import app as drafter_app
from .models import app as models_app
from .plan import plan_command
from .profile import profile_command
from .serve import serve_command

app = typer.Typer(
    help="Lossless speculative decoding for local LLMs. Run `edgespec chat` to talk to the default models.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(models_app, name="models")
app.add_typer(drafter_app, name="drafter")
app.command("plan")(plan_command)
app.command("profile")(profile_command)
app.command("serve")(serve_command)
app.command("bench")(bench_command)

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
NglOpt = typer.Option(None, "-ngl", "--gpu-layers", help="Target layers on the GPU (default: the plan's).", show_default=False)
NgldOpt = typer.Option(None, "-ngld", "--gpu-layers-draft", help="Drafter layers on the GPU (default: the plan's).", show_default=False)
MaxDraftOpt = typer.Option(None, "--max-draft", help="Most tokens drafted per step (default: the plan's budget).", show_default=False)
DraftLengthOpt = typer.Option(None, "--draft-length", show_default=False,
                              help="Draft exactly K tokens with the draft model at every step, paying or not (for experiments).")
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
                          "streaming a target too big for the GPU's memory (torch: `pip install edgespec[torch]`, onnx: "
                          "`pip install edgespec[onnx]`).")
ScheduleOpt = typer.Option(E.schedule, "--schedule", help="sequential (draft, then verify), parallel (the draft model "
                           "drafts in a thread of its own while the target verifies; on a CPU alone the cores are split) "
                           "or auto: the plan's choice.")
DraftBackendOpt = typer.Option(E.draft_backend, "--draft-backend",
                               help="Draft model backend: llama (llama.cpp), torch or onnx (onnxruntime).")


def _engine_options(model, model_opt, draft, ngram, no_ngram, plain, ctx, threads, threads_draft, ngl, ngld, max_draft,
                    draft_length=None, backend=E.backend, draft_backend=E.draft_backend, schedule=E.schedule) -> EngineOptions:
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
    return EngineOptions(
        model=model or model_opt, draft=draft, ngram=not no_ngram, draft_model=not ngram, plain=plain,
        n_ctx=ctx, n_threads=threads, n_threads_draft=threads_draft, n_gpu_layers=ngl,
        n_gpu_layers_draft=ngld, max_draft=max_draft, draft_length=draft_length, backend=backend,
        draft_backend=draft_backend, schedule=schedule)


def _stats_format(value: str) -> str:
    if value not in ("text", "json", "none"):
        raise EdgespecError(f"--stats must be text, json or none, not {value!r}")
    return value


@app.command()
def chat(
    model: Optional[str] = ModelArg, model_opt: Optional[str] = ModelOpt, draft: Optional[str] = DraftOpt,
    ngram: bool = NgramOpt, no_ngram: bool = NoNgramOpt, plain: bool = PlainOpt,
    ctx: int = CtxOpt, threads: Optional[int] = ThreadsOpt, threads_draft: Optional[int] = ThreadsDraftOpt,
    ngl: Optional[int] = NglOpt, ngld: Optional[int] = NgldOpt, max_draft: Optional[int] = MaxDraftOpt,
    draft_length: Optional[int] = DraftLengthOpt, backend: str = BackendOpt, draft_backend: str = DraftBackendOpt,
    schedule: str = ScheduleOpt, temp: float = TempOpt, top_k: int = TopKOpt, top_p: float = TopPOpt, min_p: float = MinPOpt,
    seed: Optional[int] = SeedOpt, n: int = NOpt, stop: Optional[List[str]] = StopOpt,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt.", show_default=False),
    stats: str = StatsOpt,
) -> None:
    """Chat in the terminal. With no model, the default Qwen2.5-Coder 1.5B; the plan picks the drafters."""
    from .chat import run_chat

    _run(lambda: run_chat(
        _engine_options(model, model_opt, draft, ngram, no_ngram, plain, ctx, threads, threads_draft, ngl, ngld, max_draft,
                        draft_length, backend, draft_backend, schedule),
        SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, max_tokens=n,
                       stop=tuple(stop or ())),
        system, _stats_format(stats)))


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
    schedule: str = ScheduleOpt, temp: float = TempOpt, top_k: int = TopKOpt, top_p: float = TopPOpt, min_p: float = MinPOpt,
    seed: Optional[int] = SeedOpt, n: int = NOpt, stop: Optional[List[str]] = StopOpt,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt (chat template only).", show_default=False),
    stats: str = StatsOpt,
) -> None:
    """Generate one reply to -p TEXT or -f FILE and exit."""
    from .chat import run_generate

    def go():
        text = _read_prompt(prompt, file)
        run_generate(
            _engine_options(model, model_opt, draft, ngram, no_ngram, plain, ctx, threads, threads_draft, ngl, ngld, max_draft,
                            draft_length, backend, draft_backend, schedule),
            SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, max_tokens=n,
                       stop=tuple(stop or ())),
            text, system, raw, _stats_format(stats))

    _run(go)


def _read_prompt(prompt: str | None, file: Path | None) -> str:
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


def _run(fn) -> None:
    """Run a command; an EdgespecError becomes one line on stderr and exit code 1."""
    try:
        fn()
    except EdgespecError as e:
        typer.echo(f"edgespec: error: {e}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        raise typer.Exit(130)


def main() -> None:
    app()
