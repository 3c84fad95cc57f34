"""`qconvert inspect`, `verify`, `check` and `quantizers`: look at outputs and checkpoints, prove them."""

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from qconvert.cli.common import app, run_command, say, stdout_console
from qconvert.errors import QConvertError


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="A qconvert output folder, or any checkpoint.")],
    fold: Annotated[
        bool, typer.Option("--fold", help="One row per tensor kind, layer numbers folded into '*'.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")] = False,
) -> None:
    """Show every tensor: its scheme, stored bytes and bits per weight, with totals."""
    from qconvert.inspection import fold_layers, inspect_rows

    def action() -> None:
        rows, totals = inspect_rows(path)
        if fold:
            rows = fold_layers(rows)
        if as_json:
            print(json.dumps({"tensors": rows, "totals": totals}, sort_keys=True))
            return
        table = Table(title=str(path), show_footer=True)
        for column, footer in [
            ("tensor", "total"),
            ("scheme", ""),
            ("shape", ""),
            ("bytes", f"{totals['stored_bytes']:,}"),
            ("bits/weight", str(totals["bits_per_weight"])),
            ("rel. MSE", ""),
        ]:
            table.add_column(
                column, footer=footer, justify="right" if column in ("bytes", "bits/weight", "rel. MSE") else "left"
            )
        for r in rows:
            mse = "" if r["relative_mse"] is None else f"{r['relative_mse']:.2e}"
            name = f"{r['name']} ×{r['count']}" if r.get("count", 1) > 1 else r["name"]
            table.add_row(
                name, r["scheme"], "×".join(map(str, r["shape"])), f"{r['bytes']:,}", f"{r['bits_per_weight']:.3f}", mse
            )
        stdout_console().print(table)
        if totals.get("quantized_bits_per_weight") is not None:
            stdout_console().print(
                f"{totals['parameters']:,} parameters; quantized tensors: {totals['quantized_parameters']:,} "
                "parameters "
                f"at {totals['quantized_bits_per_weight']} bits per weight (scales and zero points counted); "
                f"whole file {totals['bits_per_weight']} bits per weight.",
                highlight=False,
            )

    run_command(action)


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="A qconvert output folder.")],
    max_bpw: Annotated[
        Optional[float],
        typer.Option(help="Fail (exit 4) if the quantized tensors take more bits per weight than this."),
    ] = None,
    max_size: Annotated[
        Optional[str], typer.Option(help="Fail (exit 4) if the weights take more than this, e.g. 100MB.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Re-read an output: checksums, shapes, and that every quantized tensor unpacks; optionally gate its size."""
    from qconvert.errors import QualityGateError, VerificationError
    from qconvert.settings import parse_size
    from qconvert.verification import measured_totals, verify_output

    def action() -> int:
        problems, checked = verify_output(path)
        totals = measured_totals(path) if not problems else {}  # from the files, not the manifest's say-so
        gate = []
        if max_bpw is not None and totals and (totals.get("quantized_bits_per_weight") or 0) > max_bpw:
            gate.append(
                f"{totals['quantized_bits_per_weight']} bits per quantized weight is above the {max_bpw} allowed"
            )
        if max_size is not None and totals and totals["stored_bytes"] > parse_size(max_size):
            gate.append(f"{totals['stored_bytes'] / 1e6:.1f} MB of weights is above the {max_size} allowed")
        if gate and not problems:
            if as_json:
                print(
                    json.dumps(
                        {"ok": False, "tensors_checked": checked, "problems": [], "gate": gate, "totals": totals}
                    )
                )
            raise QualityGateError(f"quality gate failed: {'; '.join(gate)}.")
        if as_json:
            print(
                json.dumps(
                    {
                        "ok": not problems,
                        "tensors_checked": checked,
                        "problems": problems,
                        "gate": gate,
                        "totals": totals,
                    }
                )
            )
        else:
            _print_problems(problems, f"{path}: {checked} tensors verified")
        return VerificationError.exit_code if problems else 0

    run_command(action)


class Runtime(str, Enum):
    transformers = "transformers"
    llama_cpp = "llama.cpp"
    mlx = "mlx"
    vllm = "vllm"


@app.command()
def check(
    path: Annotated[Path, typer.Argument(help="A model folder (any format qconvert writes) or a .gguf file.")],
    runtime: Annotated[Runtime, typer.Option("--runtime", help="The runtime that is to load it.")],
    forward: Annotated[
        bool,
        typer.Option(
            "--forward",
            help=(
                "Also load the weights in the runtime and compare its logits on a few tokens with qconvert's "
                "dequantized model."
            ),
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Check that a runtime would load the model: config, tensor names, dtypes, shapes and schemes its
    loaders and kernels accept, and for transformers its own loading path run on the meta device (every
    weight it would leave missing or ignore). Exit 3, with every problem and its tensor, if not."""
    from qconvert.compatibility import check as check_runtime
    from qconvert.errors import VerificationError

    def action() -> int:
        found, problems = check_runtime(path, runtime.value, forward=forward)
        if as_json:
            print(
                json.dumps(
                    {
                        "ok": not problems,
                        "format": found,
                        "runtime": runtime.value,
                        "problems": [p.to_dict() for p in problems],
                    },
                    sort_keys=True,
                )
            )
        else:
            _print_problems(
                [f"{p.tensor + ': ' if p.tensor else ''}{p.message}" for p in problems],
                f"{path} ({found}) has what {runtime.value} needs"
                + (f", and the logits {runtime.value} computes match qconvert's" if forward else ""),
            )
        return VerificationError.exit_code if problems else 0

    run_command(action)


def _print_problems(problems: list[str], all_good: str) -> None:
    """One ✗ line per problem on stderr, or one ✓ line when there are none."""
    for problem in problems:
        say("✗", "red", problem)
    if not problems:
        say("✓", "green", all_good)


@app.command()
def quantizers(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """List the registered quantizers, built in and from installed plugins."""
    from qconvert.quantizers import registry

    def action() -> None:
        rows = []
        for name in registry.available():
            try:
                cls = registry.get(name)
                rows.append(
                    {
                        "name": name,
                        "class": f"{cls.__module__}.{cls.__qualname__}",
                        "calibration": cls.requires_calibration,
                        "description": cls.description,
                        "error": None,
                    }
                )
            except QConvertError as exc:
                rows.append({"name": name, "class": None, "calibration": None, "description": "", "error": str(exc)})
        if as_json:
            print(json.dumps(rows))
            return
        table = Table("name", "class", "needs calibration", "description")
        for r in rows:
            table.add_row(
                r["name"],
                r["class"] or Text("failed to load", style="red"),
                "" if r["error"] else ("yes" if r["calibration"] else "no"),
                r["error"] or r["description"],
            )
        stdout_console().print(table)

    run_command(action)
