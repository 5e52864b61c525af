"""heartseg-export: turn a training run's model.pt into one self-contained ONNX file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from heartseg.runtime.atomic import atomic_output, write_text_atomic
from heartseg.runtime.cli_common import new_app, version_option
from heartseg.runtime.errors import HeartsegError
from heartseg.runtime.outputs import check_outputs

app = new_app(help="Export model.pt to ONNX with the calibrated threshold and the whole contract baked in.")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A training run's model.pt (loaded with weights_only=True: no pickled code runs)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="ONNX file to write (default: model.onnx beside the checkpoint)."),
    scan: Optional[List[Path]] = typer.Option(None, metavar="SCAN", help="Real scan(s) for the end-to-end parity check (repeatable)."),
    overwrite: bool = typer.Option(False, help="Replace an existing output file."),
    threads: Optional[int] = typer.Option(None, help="ONNX Runtime threads for the parity check."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write <output stem>.fp16.onnx (float16 weights) with its held-out Dice change."),
    int8: bool = typer.Option(False, "--int8", help="Also write <output stem>.int8.onnx (ONNX Runtime static quantisation, calibrated on training patches) with its held-out Dice change."),
    data: Optional[List[Path]] = typer.Option(None, metavar="DATASET", help="The training dataset(s) (MSD layout; repeat --data for a model trained on several); needed by --fp16/--int8 to measure them on the fold's held-out cases."),
    score_calibration: Optional[Path] = typer.Option(
        None, "--score-calibration", metavar="JSON",
        help="Replace the fold's QC score calibrations by those in this file: a run's summary.json (pooled over "
             "the held-out cases of every fold run; --tta's too), or a calibration's own JSON (the plain one only; "
             "--tta's stays the fold's)."),
    version: bool = version_option(),
) -> None:
    """Export, then check that ONNX Runtime reproduces PyTorch (probabilities within 1e-4, masks on 99.99 %
    of voxels) on real-size random inputs and on the given scans; the file is only written when it does.

    Exit codes: 0 written, 1 parity failed (nothing written), 2 bad input (missing or incomplete
    checkpoint, a pickle that is not plain weights, existing output).
    """
    from rich.console import Console

    console = Console(stderr=True, markup=False, highlight=False)
    try:
        import onnx  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        console.print("error: heartseg-export needs PyTorch and onnx: pip install 'heartseg[train]'")
        raise typer.Exit(2)
    from heartseg.export.model_file import load_trained_model
    from heartseg.export.onnx_export import export_onnx
    from heartseg.export.parity import check_parity

    try:
        output = output or checkpoint.with_name("model.onnx")
        if (fp16 or int8) and not data:
            raise HeartsegError("--fp16/--int8 need --data DATASET to measure the variants on the held-out cases")
        planned = planned_outputs(output, fp16, int8)
        check_outputs([checkpoint, score_calibration, *(scan or [])], planned)
        for what, path in planned:
            if path.exists() and not overwrite:
                raise HeartsegError(f"{what} {path}: exists (use --overwrite to replace it)")
        for path in scan or []:
            if not path.is_file():
                raise HeartsegError(f"{path}: no such scan")
        calibrations = {}
        if score_calibration is not None:
            from heartseg.export.qc_calibration import read_score_calibrations

            calibrations = read_score_calibrations(score_calibration)
        model = load_trained_model(checkpoint)
        if calibrations:
            from dataclasses import replace

            model = replace(model, contract=replace(model.contract, **calibrations))
        output.parent.mkdir(parents=True, exist_ok=True)
        # Only a file that passed the parity check ever appears at the output path.
        with atomic_output(output) as tmp:
            export_onnx(model, tmp)
            results = check_parity(model, tmp, list(scan or []), threads)
        for r in results:
            console.print(f"parity {r.what} {r.shape}: max |diff| {r.max_abs_diff:.2e}, "
                          f"masks agree on {100 * r.mask_agreement:.4f} % of voxels")
        report = dict(planned)["parity report"]
        write_text_atomic(report, json.dumps([r.to_dict() for r in results], indent=1))
        size = output.stat().st_size / 1e6
        console.print(f"wrote {output} ({size:.1f} MB); threshold {model.contract.final_stage.threshold} "
                      f"from the file's calibration; parity report {report}")
        if fp16 or int8:
            _variants(console, model, output, data, fp16, int8, threads)
    except HeartsegError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)


def planned_outputs(output: Path, fp16: bool, int8: bool) -> list[tuple[str, Path]]:
    """Every file an export writes, named for messages: the model, its parity report and the variants."""
    stem = output.name.removesuffix(".onnx")
    planned = [("-o", output), ("parity report", output.with_name(stem + ".parity.json"))]
    if fp16:
        planned.append(("fp16 model", output.with_suffix(".fp16.onnx")))
    if int8:
        planned.append(("int8 model", output.with_suffix(".int8.onnx")))
    if fp16 or int8:
        planned.append(("variants report", output.with_name(stem + ".variants.json")))
    return planned


def _variants(console, model, output: Path, data: list[Path], fp16: bool, int8: bool, threads: int | None) -> None:
    """Write the requested variants and report each one's held-out Dice beside the fp32 model's."""
    from heartseg.export.variants import (
        calibration_feeds,
        compare,
        held_out_dice,
        make_fp16,
        make_int8,
        record_metrics,
    )
    from heartseg.train.cache import default_cache_root, prepare_case
    from heartseg.train.dataset import read_datasets

    by_id = {c.case_id: c for info in read_datasets(data) for c in info.cases}
    val_ids, train_ids = model.metrics.get("val_cases") or [], model.metrics.get("train_cases") or []
    missing = [i for i in val_ids + train_ids if i not in by_id]
    if not val_ids or missing:
        raise HeartsegError(f"{', '.join(map(str, data))}: cannot find the model's held-out cases there "
                            f"({'none recorded' if not val_ids else 'missing ' + ', '.join(missing)})")
    val_cases = [prepare_case(by_id[i], model.contract, default_cache_root()) for i in val_ids]
    dice_fp32 = held_out_dice(output, val_cases, threads)
    reports = []
    if fp16:
        path = make_fp16(output, output.with_suffix(".fp16.onnx"))
        reports.append(record_metrics(compare("fp16", output, path, val_cases, dice_fp32, threads)))
    if int8:
        train_cases = [prepare_case(by_id[i], model.contract, default_cache_root()) for i in train_ids]
        path = make_int8(output, output.with_suffix(".int8.onnx"), calibration_feeds(model.contract, train_cases))
        reports.append(record_metrics(compare("int8", output, path, val_cases, dice_fp32, threads)))
    for r in reports:
        verdict = "within 0.005" if r.within_tolerance else "[bold red]DROPS MORE THAN 0.005[/]"
        console.print(f"{r.variant}: {r.path} ({r.size_mb:.1f} MB); held-out Dice {r.dice_variant:.4f} vs fp32 "
                      f"{r.dice_fp32:.4f} ({r.dice_change:+.4f}, {verdict}) on {', '.join(r.cases)}")
    report_path = output.with_name(output.name.removesuffix(".onnx") + ".variants.json")
    write_text_atomic(report_path, json.dumps([r.to_dict() for r in reports], indent=1))


def main() -> None:
    """Console entry point."""
    app(prog_name="heartseg-export")


if __name__ == "__main__":
    main()
