"""`edgespec drafter build|info`: drafters made from the target itself."""

from __future__ import annotations

from pathlib import Path

import typer

from edge_spec.models.registry import DEFAULT_TARGET
from edge_spec.surfaces.cli.common import progress_bar, run
from edge_spec.types import EdgespecError

app = typer.Typer(help="Build a drafter from a model (QuantSpec self-drafter, VocabTrim, layer skipping) "
                       "and inspect built ones.",
                  no_args_is_help=True)


@app.command("build")
def build_command(
    source: str = typer.Argument(..., metavar="SOURCE.gguf",
                                 help="quant: the target (F16, BF16 or Q8_0); trim: the drafter to trim (or the target); "
                                      "skip: the target."),
    method: str = typer.Option("quant", "--method",
                               help="quant: the target's weights requantized to --bits (QuantSpec), its agreement measured. "
                                    "trim: the LM head cut to the K tokens the target produces most (VocabTrim). "
                                    "skip: the target without the layers it misses least (layer skipping, "
                                    "requantized first when the target is F16, BF16 or Q8_0)."),
    bits: str | None = typer.Option(None, "--bits", show_default=False,
                                    help="Quantization of the drafter: q2_k, q3_k_m, q4_0, q4_1, q4_k_m, q5_k_m, q8_0. quant: "
                                         "default q4_0. skip: q4_0, used only for a target above 6 bits per weight. "
                                         "trim: default none (the source's weights); given, the trimmed copy is "
                                         "requantized too, its head kept at q8_0; of an F16, BF16 or Q8_0 target counted "
                                         "with itself, a self-drafter whose agreement is measured."),
    out: Path | None = typer.Option(None, "-o", "--out", show_default=False,
                                       help="Output file (default: the drafters folder, where chat finds it)."),
    force: bool = typer.Option(False, "--force", help="Replace the output file if it exists."),
    keep: int | None = typer.Option(None, "--keep", show_default=False,
                                    help="trim: tokens to keep (default: chosen by measuring coverage and predicted speed)."),
    target: str | None = typer.Option(None, "--target", show_default=False,
                                      help="trim: the model whose outputs are counted (default: the source itself)."),
    calibration: Path | None = typer.Option(None, "--calibration", show_default=False,
                                            help="A text file of your own to measure on, besides the shipped replies "
                                                 "(quant: the copy's agreement with the target; trim, skip: the choice)."),
    mem_budget: str | None = typer.Option(None, "--mem-budget", show_default=False,
                                          help="Refuse a drafter that could not run in this much memory (e.g. 2G): "
                                               "the budget you will run the target in. trim: K is chosen "
                                               "for a target run within it."),
    layers: str | None = typer.Option(None, "--layers", show_default=False,
                                      help="skip: the layers to leave out, e.g. 3,5,7 (numbered from 0; never the "
                                           "first or last). Default: chosen by measuring agreement and predicted speed."),
) -> None:
    """Build a drafter; `edgespec chat SOURCE.gguf` then finds and weighs it."""
    # the builders load llama.cpp and numpy: imported when a drafter is built, not for --help
    from edge_spec.build.quant import build
    from edge_spec.models.provenance import info
    from edge_spec.options import parse_size
    from edge_spec.pipeline.resolve import resolve_model

    def go():
        with progress_bar() as report:
            path = build(resolve_model(source, DEFAULT_TARGET), method, out, bits, force, report, keep=keep,
                         target=resolve_model(target, DEFAULT_TARGET) if target else None, calibration=calibration,
                         layers=_layer_list(layers) if layers is not None else None,
                         memory_budget=parse_size(mem_budget) if mem_budget else None)
        typer.echo(f"built {path} ({path.stat().st_size / 2**30:.2f} GiB)")
        built = info(path)
        if method == "quant" and "agreement" in built:
            typer.echo(f"  agreement with the target: {built['agreement']:.3f} ({built.get('calibration', '')})")
        for line in f"{built.get('k_choice', '')}; {built.get('skip_choice', '')}".split("; "):
            if line:
                typer.echo(f"  {line}")

    run(go)


@app.command("info")
def info_command(file: Path = typer.Argument(..., metavar="FILE.gguf", help="A GGUF file.")) -> None:
    """Show how a drafter was built (method, quantization, source and its SHA-256, date)."""
    # reading GGUF metadata brings numpy: imported when it runs
    from edge_spec.models.provenance import info

    def go():
        found = info(file)
        if not found:
            typer.echo(f"{file} was not built by `edgespec drafter build` (no edgespec.drafter.* metadata)")
            return
        for key, value in found.items():
            if isinstance(value, list):  # skipped_layers
                value = ",".join(map(str, value))
            typer.echo(f"{key:>18}: {f'{value:.4f}' if isinstance(value, float) else value}")

    run(go)


def _layer_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise EdgespecError(f"--layers {text!r}: give layer numbers separated by commas, e.g. --layers 3,5,7") from None
