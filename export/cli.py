"""heartseg-export: turn a training run's model.pt into one self-contained ONNX file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import List, Optional

import typer

from heartseg.runtime.errors import HeartsegError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Export model.pt to ONNX with the calibrated threshold and the whole contract baked in.")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A training run's model.pt (loaded with weights_only=True: no pickled code runs)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="ONNX file to write (default: model.onnx beside the checkpoint)."),
    scan: Optional[List[Path]] = typer.Option(None, help="Real scan(s) for the end-to-end parity check (repeatable)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output file."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads for the parity check."),
) -> None:
    """Export, then check that ONNX Runtime reproduces PyTorch (probabilities within 1e-4, masks on 99.99 %
    of voxels) on real-size random inputs and on the given scans; the file is only written when it does.

    Exit codes: 0 written, 1 parity failed (nothing written), 2 bad input (missing or incomplete
    checkpoint, a pickle that is not plain weights, existing output).
    """
    from rich.console import Console

    console = Console(stderr=True)
    try:
        import torch  # noqa: F401
        import onnx  # noqa: F401
    except ImportError:
        console.print("error: heartseg-export needs PyTorch and onnx: pip install 'heartseg[train]'")
        raise typer.Exit(2)
    from heartseg.export.model_file import load_trained_model
    from heartseg.export.onnx_export import export_onnx
    from heartseg.export.parity import check_parity

    try:
        output = output or checkpoint.with_name("model.onnx")
        if output.exists() and not overwrite:
            raise HeartsegError(f"{output}: exists (use --overwrite to replace it)")
        for path in scan or []:
            if not path.is_file():
                raise HeartsegError(f"{path}: no such scan")
        model = load_trained_model(checkpoint)
        output.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=output.parent)
        os.close(fd)
        try:
            export_onnx(model, Path(tmp))
            results = check_parity(model, Path(tmp), list(scan or []), threads)
            os.replace(tmp, output)
        finally:
            Path(tmp).unlink(missing_ok=True)
        for r in results:
            console.print(f"parity {r.what} {r.shape}: max |diff| {r.max_abs_diff:.2e}, "
                          f"masks agree on {100 * r.mask_agreement:.4f} % of voxels")
        report = output.with_name(output.name.removesuffix(".onnx") + ".parity.json")
        report.write_text(json.dumps([r.to_dict() for r in results], indent=1))
        size = output.stat().st_size / 1e6
        console.print(f"wrote {output} ({size:.1f} MB); threshold {model.contract.final_stage.threshold} "
                      f"from the file's calibration; parity report {report}")
    except HeartsegError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(exc.exit_code)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
