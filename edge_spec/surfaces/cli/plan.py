"""`edgespec plan`: what the planner would do with a model on a machine, and why."""

from __future__ import annotations

import json

import typer

from edge_spec.defaults import MAX_DRAFT, N_CTX
from edge_spec.plan import planner, profile

GiB = 2**30


def make_plan(model: str | None, draft: str | None, profile_name: str | None, ctx: int,
              max_draft: int, use_history: bool, notes: list | None = None, backend: str = "auto",
              memory_budget: int | None = None, rpc: tuple[str, ...] = ()) -> planner.Plan:
    """The plan `chat` would follow on this machine, or a what-if plan on a profile; what the
    engine would decide on its own (e.g. a GPU llama.cpp cannot use) goes to `notes`."""
    from edge_spec.plan.costmodel import model_shape
    from edge_spec.backends.load import torch_offload_possible
    from edge_spec.options import EngineOptions, model_paths
    from edge_spec.plan.choose import plan_for

    options = EngineOptions(model=model, draft=draft, n_ctx=ctx, max_draft=max_draft, history=use_history,
                            backend=backend, memory_budget=memory_budget, rpc=rpc)
    target_path, draft_path = model_paths(options)
    if profile_name is None:  # this machine: what `chat` would do, with its calibrations
        return plan_for(options, target_path, draft_path, notes if notes is not None else [])
    prof = profile.load(profile_name)
    if memory_budget is not None:
        prof = prof.model_copy(update={"ram_available_bytes": memory_budget})
    knowledge = planner.Knowledge()
    if use_history:
        from edge_spec.plan.history import History

        knowledge = History().knowledge(target_path, draft_path)
    from edge_spec.plan.choose import rpc_workers

    return planner.plan(model_shape(target_path), prof, model_shape(draft_path) if draft_path else None,
                        n_ctx=ctx, knowledge=knowledge, max_draft=max_draft,
                        offload=torch_offload_possible(backend, target_path), workers=rpc_workers(options))


def plan_dict(p: planner.Plan) -> dict:
    def alt(a: planner.Alternative) -> dict:
        return {
            "strategy": a.strategy, "description": a.describe(p.target, p.drafter),
            "target_gpu_layers": a.target.ngl(p.target),
            "target_backend": "torch" if a.target.offload else "llama",
            "target_disk_bytes_per_pass": a.target.disk_bytes,
            "target_rpc_layers": a.target.rpc_layers,
            "rpc_workers": [w.endpoint for w in a.target.workers],
            "drafter_gpu_layers": a.drafter.ngl(p.drafter) if a.drafter else None,
            "drafter_model": a.drafter_model or None,
            "draft_length": a.draft_length, "acceptance": a.acceptance,
            "tokens_per_second": round(a.tokens_per_second, 2),
            "vs_plain": round(a.tokens_per_second / p.plain.tokens_per_second, 3),
            "costs": a.costs, "ram_bytes": a.ram, "vram_bytes": a.vram, "why": a.why,
        }

    return {
        "profile": p.profile, "target": p.target.path, "drafter": p.drafter.path if p.drafter else None,
        "chosen": alt(p.chosen), "alternatives": [alt(a) for a in p.alternatives],
        "rejected": list(p.rejected), "n_ctx": p.n_ctx, "type_k": p.type_k, "type_v": p.type_v,
        "threads": p.threads, "max_draft": p.max_draft, "reasons": p.reasons(),
        "drafter_candidates": [{"path": str(v.path) if v.path else None, "label": v.label, "kept": v.kept,
                                "tokens_per_second": round(v.tokens_per_second, 2) if v.tokens_per_second else None,
                                "why": v.why} for v in p.drafters],
    }


def print_plan(p: planner.Plan) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    title = f"plan for {p.target.name}" + (f" with drafter {p.drafter.name}" if p.drafter else "") + f" on {p.profile!r}"
    table = Table(title=title, title_justify="left")
    for col in ("", "strategy", "target", "drafter", "k", "accept", "tok/s", "×plain", "costs", "RAM", "VRAM"):
        table.add_column(col, justify="left" if col in ("strategy", "target", "drafter", "costs") else "right")
    base = p.plain.tokens_per_second
    for a in p.alternatives:
        table.add_row(
            "→" if a == p.chosen else "", a.strategy, a.target.describe(p.target),
            f"{a.drafter_model.removesuffix('.gguf')[:28]} {a.drafter.describe(p.drafter)}" if a.drafter else "-",
            str(a.draft_length or "-"),
            f"{a.acceptance:.2f}" if a.acceptance is not None else "-", f"{a.tokens_per_second:.1f}",
            f"{a.tokens_per_second / base:.2f}", a.costs[:4] + ".", f"{a.ram / GiB:.1f}G", f"{a.vram / GiB:.1f}G",
            style="bold" if a == p.chosen else None)
    console.print(table)
    for line in p.reasons():
        console.print(f"  {line}")
    for line in p.rejected:
        console.print(f"  [dim]does not fit: {line}[/dim]")
    print_drafters(console, p.drafters)


def print_drafters(console, verdicts) -> None:
    """The drafter search's verdicts: every local model weighed or left out, and why."""
    from rich.markup import escape

    if not verdicts:
        return
    console.print(f"drafter candidates ({len(verdicts) - 1} local models):")
    for v in verdicts:
        rate = f"{v.tokens_per_second:6.1f} tok/s" if v.tokens_per_second else " " * 12
        style = "bold" if v.kept else "dim" if v.tokens_per_second is None else ""
        line = f"  {'→' if v.kept else ' '} {rate}  {escape(v.label)}: {escape(v.why)}"
        console.print(f"[{style}]{line}[/{style}]" if style else line, soft_wrap=True)


def plan_command(
    model: str | None = typer.Argument(None, metavar="[TARGET.gguf]", show_default=False,
                                          help="Target model: a .gguf path or a name from `edgespec models list` (default: Qwen2.5-Coder-1.5B)."),
    draft: str | None = typer.Option(None, "-md", "--draft", show_default=False,
                                        help="Draft model (default: every local model that can draft for the target is weighed)."),
    profile_name: str | None = typer.Option(
        None, "--profile", show_default=False,
        help="Plan for this hardware profile instead of this machine: a profile JSON file, a saved profile's name, "
             f"or a reference profile ({', '.join(profile.reference_names())})."),
    ctx: int = typer.Option(N_CTX, "-c", "--ctx-size", help="Context size in tokens to plan memory for."),
    max_draft: int = typer.Option(MAX_DRAFT, "--max-draft", help="Longest draft to consider."),
    no_history: bool = typer.Option(False, "--no-history", help="Ignore acceptance measured in past sessions (use priors)."),
    backend: str = typer.Option(
        "auto", "--backend", help="Target backend: llama (llama.cpp), torch, onnx, or auto: llama.cpp, or torch "
                                  "streaming a target too big for the GPU's memory (offloading; needs torch installed). "
                                  "Only offloading has its own costs: the others are planned with llama.cpp's."),
    mem_budget: str | None = typer.Option(None, "--mem-budget", show_default=False,
                                          help="Memory the models may use, e.g. 4G (default: this machine's available "
                                               "RAM or its cgroup's limit; with --profile, the profile's)."),
    rpc: str | None = typer.Option(None, "--rpc", metavar="HOST:PORT[,HOST:PORT...]", show_default=False,
                                   help="ggml RPC workers to plan with (probed): a target that does not fit here is "
                                        "split across them."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Show the plan for a model on this machine or a hardware profile, and why it won.

    Every strategy and placement weighed is listed with its predicted tokens/s."""
    from edge_spec.surfaces.cli.common import run

    def go():
        notes: list[str] = []
        from edge_spec.plan.memory import parse_size

        budget = parse_size(mem_budget) if mem_budget is not None else None
        p = make_plan(model, draft, profile_name, ctx, max_draft, not no_history, notes, backend, budget,
                      rpc or ())
        if as_json:
            typer.echo(json.dumps(plan_dict(p) | {"notes": notes}, indent=1))
        else:
            print_plan(p)
            for line in notes:
                typer.echo(f"  note: {line}")

    run(go)
