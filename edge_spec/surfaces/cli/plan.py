"""`edgespec plan`: what the planner would do with a model on a machine, and why."""

from __future__ import annotations

import dataclasses
import json

import typer

from edge_spec.defaults import MAX_DRAFT
from edge_spec.options import EngineOptions
from edge_spec.plan import planner, profile
from edge_spec.surfaces.cli.common import engine_command, progress_bar, run

GiB = 2**30


def make_plan(options: EngineOptions, notes: list | None = None) -> planner.Plan:
    """The plan `chat` would follow on this machine, or a what-if plan on the profile the options
    name; what the engine would decide on its own (e.g. a GPU llama.cpp cannot use) goes to `notes`."""
    # planning reads GGUF headers and llama.cpp's build facts: imported when a plan is made, not for --help
    from edge_spec.backends.load import torch_offload_possible
    from edge_spec.models.shape import model_shape
    from edge_spec.pipeline.resolve import model_paths
    from edge_spec.plan.choose import plan_for, rpc_workers
    from edge_spec.plan.history import History

    target_path, draft_path = model_paths(options)
    if options.planning.profile is None:  # this machine: what `chat` would do, with its calibrations
        return plan_for(options, target_path, draft_path, notes if notes is not None else [])
    prof = profile.load(options.planning.profile)
    if options.memory.budget is not None:
        prof = prof.model_copy(update={"ram_available_bytes": options.memory.budget})
    knowledge = History().knowledge(target_path, draft_path) if options.planning.history else planner.Knowledge()
    return planner.plan(model_shape(target_path), prof, model_shape(draft_path) if draft_path else None,
                        n_ctx=options.memory.n_ctx, knowledge=knowledge,
                        max_draft=options.drafting.max_draft or MAX_DRAFT,
                        offload=torch_offload_possible(options.model.backend, target_path), workers=rpc_workers(options))


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
        "self_drafters": [{"bits": c.bits, "path": str(c.path), "built": c.built, "drafter_bytes": c.drafter_bytes,
                           "acceptance": round(c.acceptance, 3), "acceptance_source": c.acceptance_source,
                           "tokens_per_second": round(c.tokens_per_second, 2), "fits": bool(c.tokens_per_second),
                           "target_pinned_bytes": c.pinned_bytes, "target_disk_bytes_per_pass": c.disk_bytes,
                           "best": c.best} for c in p.self_drafters],
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
    if p.self_drafters:
        console.print("self-drafters (low-bit copies of the target: fewer bits leave more of the target in RAM "
                      "and agree with it less often):")
        for c in p.self_drafters:
            console.print(f"  {'→' if c.best else ' '} {c.describe()}", style="bold" if c.best else None, soft_wrap=True)


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


@engine_command
def plan_command(
    options: EngineOptions,
    profile_name: str | None = typer.Option(
        None, "--profile", show_default=False,
        help="Plan for this hardware profile instead of this machine: a profile JSON file, a saved profile's name, "
             f"or a reference profile ({', '.join(profile.reference_names())})."),
    no_history: bool = typer.Option(False, "--no-history", help="Ignore acceptance measured in past sessions (use priors)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    build_drafter: bool = typer.Option(
        False, "--build-drafter",
        help="Build the self-drafter the plan predicts fastest (a low-bit copy of an F16, BF16 or Q8_0 target, "
             "kept in the drafters folder where chat finds it), then plan again with it."),
) -> None:
    """Show the plan for a model on this machine or a hardware profile, and why it won.

    Every strategy and placement weighed is listed with its predicted tokens/s."""
    notes: list[str] = []
    options = dataclasses.replace(options, planning=dataclasses.replace(
        options.planning, profile=profile_name, history=not no_history))
    p = make_plan(options, notes)
    if build_drafter:
        p = _build_best_self_drafter(options, p, notes)
    if as_json:
        typer.echo(json.dumps(plan_dict(p) | {"notes": notes}, indent=1))
    else:
        print_plan(p)
        for line in notes:
            typer.echo(f"  note: {line}")


def _build_best_self_drafter(options: EngineOptions, p: planner.Plan, notes: list) -> planner.Plan:
    """--build-drafter: build the best self-drafter the plan weighed, unless it is built or does
    not pay; then the plan made again, which finds it."""
    # the builder loads llama.cpp's quantizer and numpy: imported when a drafter is built, not for --help
    from edge_spec.build.quant import build

    best = next((c for c in p.self_drafters if c.best), None)
    if best is None:
        raise typer.BadParameter("no self-drafter fits or applies here (a self-drafter is a low-bit copy of an F16, "
                                 "BF16 or Q8_0 target, with room next to it)", param_hint="--build-drafter")
    if best.built:
        typer.echo(f"the best self-drafter is built already: {best.path}", err=True)
        return p
    if best.tokens_per_second <= p.chosen.tokens_per_second:
        typer.echo(f"not building: a {best.bits} self-drafter is predicted {best.tokens_per_second:.2f} tok/s, "
                   f"no faster than the plan without it ({p.chosen.tokens_per_second:.2f})", err=True)
        return p

    def go():
        with progress_bar() as report:
            build(p.target.path, "quant", None, best.bits, False, report, memory_budget=options.memory.budget)

    run(go)
    typer.echo(f"built {best.path} ({best.path.stat().st_size / 2**30:.2f} GiB); the plan with it:", err=True)
    notes.clear()
    return make_plan(options, notes)
