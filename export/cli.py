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

app = new_app(help="Export model.pt to one ONNX pipeline file (scan to mask) with the calibrated threshold and the "
                   "whole contract baked in; --upgrade OLD.onnx NEW.onnx turns an older export into one.")


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A training run's model.pt (loaded with weights_only=True: no pickled code runs); with --upgrade, the model file to upgrade (OLD.onnx)."),
    new: Optional[Path] = typer.Argument(None, metavar="[NEW]", help="With --upgrade only: the pipeline file to write (NEW.onnx)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="ONNX file to write (default: model.onnx beside the checkpoint)."),
    scan: Optional[List[Path]] = typer.Option(None, metavar="SCAN", help="Real scan(s) for the end-to-end parity checks (repeatable)."),
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
    upgrade: bool = typer.Option(
        False, "--upgrade",
        help="heartseg-export --upgrade OLD.onnx NEW.onnx: write NEW, a pipeline file (one graph from scan to mask, "
             "what heartseg-infer runs), around the networks of OLD, a model file written by an older heartseg-export "
             "(the stages' networks only; any format heartseg reads, variants and ensembles included). The networks' "
             "weights and OLD's metadata are kept; OLD is only read and never replaced. With --scan, NEW's masks are "
             "checked against the reference pipeline run with OLD's networks. Needs no PyTorch."),
    version: bool = version_option(),
) -> None:
    """Export to one pipeline file (the graph from scan to mask around the stages' networks), after checking that
    ONNX Runtime reproduces PyTorch on the networks (probabilities within 1e-4, masks on 99.99 % of voxels) on
    real-size random inputs and on the given scans, and that the graph's masks agree with the reference pipeline's
    on those scans (Dice at least 0.995); the file is only written when they do. With --upgrade, turn a model file
    of an older heartseg-export into a pipeline file instead.

    Exit codes: 0 written, 1 parity failed (nothing written), 2 bad input (missing or incomplete
    checkpoint, a pickle that is not plain weights, existing output, a file to upgrade that already is a
    pipeline file).
    """
    from rich.console import Console

    console = Console(stderr=True, markup=False, highlight=False)
    try:
        if upgrade:
            refused = [name for name, given in (("-o", output), ("--fp16", fp16), ("--int8", int8), ("--data", data),
                                                ("--score-calibration", score_calibration)) if given]
            if refused:
                raise HeartsegError(f"--upgrade OLD.onnx NEW.onnx takes --scan, --threads and --overwrite, not "
                                    f"{', '.join(refused)}")
            _upgrade(console, checkpoint, new, list(scan or []), overwrite, threads)
            return
        if new is not None:
            raise HeartsegError(f"{new}: a second file is only for --upgrade OLD.onnx NEW.onnx; export writes -o")
        _require(console, "onnx", "torch")
        _export(console, checkpoint, output, list(scan or []), overwrite, threads, fp16, int8, data,
                score_calibration)
    except HeartsegError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)


def _require(console, *modules: str) -> None:
    """Exit 2 with the install hint when a module the command needs is missing."""
    import importlib

    try:
        for module in modules:
            importlib.import_module(module)
    except ImportError:
        needs = "PyTorch and onnx" if "torch" in modules else "onnx"
        console.print(f"error: heartseg-export needs {needs}: pip install 'heartseg[train]'")
        raise typer.Exit(2)


def _check_scans(scans: list[Path]) -> None:
    for path in scans:
        if not path.is_file():
            raise HeartsegError(f"{path}: no such scan")


def _print_parity(console, results) -> None:
    from heartseg.export.graph_parity import GraphParityResult

    for r in results:
        if isinstance(r, GraphParityResult):
            console.print(f"parity {r.what} {r.shape}: masks of the graph and the reference pipeline agree at Dice "
                          f"{r.dice:.4f} (at least {r.min_dice}), on {100 * r.mask_agreement:.4f} % of voxels")
        else:
            console.print(f"parity {r.what} {r.shape}: max |diff| {r.max_abs_diff:.2e}, "
                          f"masks agree on {100 * r.mask_agreement:.4f} % of voxels")


def _export(console, checkpoint: Path, output: Path | None, scans: list[Path], overwrite: bool, threads: int | None,
            fp16: bool, int8: bool, data: list[Path] | None, score_calibration: Path | None) -> None:
    """heartseg-export CHECKPOINT: the networks exported and checked against PyTorch, then wrapped in the
    pipeline graph and checked against the reference pipeline; the variants likewise."""
    import tempfile

    import onnx
    from heartseg.export.graph_parity import check_graph_parity
    from heartseg.export.model_file import load_trained_model
    from heartseg.export.onnx_export import export_onnx
    from heartseg.export.parity import check_parity
    from heartseg.export.pipeline_file import write_pipeline

    output = output or checkpoint.with_name("model.onnx")
    if (fp16 or int8) and not data:
        raise HeartsegError("--fp16/--int8 need --data DATASET to measure the variants on the held-out cases")
    planned = planned_outputs(output, fp16, int8)
    check_outputs([checkpoint, score_calibration, *scans], planned)
    for what, path in planned:
        if path.exists() and not overwrite:
            raise HeartsegError(f"{what} {path}: exists (use --overwrite to replace it)")
    _check_scans(scans)
    calibrations = {}
    if score_calibration is not None:
        from heartseg.export.qc_calibration import read_score_calibrations

        calibrations = read_score_calibrations(score_calibration)
    model = load_trained_model(checkpoint)
    if calibrations:
        from dataclasses import replace

        model = replace(model, contract=replace(model.contract, **calibrations))
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="heartseg-export-") as folder:
        # The stages' networks side by side: what PyTorch is compared with, and what the pipeline graph wraps.
        networks = export_onnx(model, Path(folder) / "networks.onnx")
        results = list(check_parity(model, networks, scans, threads))
        # Only a file that passed the parity checks ever appears at the output path.
        with atomic_output(output) as tmp:
            write_pipeline(onnx.load(str(networks)), tmp, checkpoint)
            results += check_graph_parity(networks, tmp, scans, threads)
        _print_parity(console, results)
        if not scans:
            console.print("no --scan given: the pipeline graph's masks were not compared with the reference "
                          "pipeline's on a real scan", soft_wrap=True)
        report = dict(planned)["parity report"]
        write_text_atomic(report, json.dumps([r.to_dict() for r in results], indent=1))
        size = output.stat().st_size / 1e6
        console.print(f"wrote {output} ({size:.1f} MB); threshold {model.contract.final_stage.threshold} "
                      f"from the file's calibration; parity report {report}")
        if fp16 or int8:
            _variants(console, model, output, networks, data, fp16, int8, threads)


def _upgrade(console, old: Path, new: Path | None, scans: list[Path], overwrite: bool, threads: int | None) -> None:
    """heartseg-export --upgrade OLD NEW: OLD's networks wrapped in the pipeline graph, written to NEW."""
    import warnings

    if new is None:
        raise HeartsegError("--upgrade needs two files: heartseg-export --upgrade OLD.onnx NEW.onnx")
    _require(console, "onnx")
    from heartseg.export.graph_parity import check_graph_parity
    from heartseg.export.pipeline_file import upgraded
    from heartseg.export.stamp import write_model
    from heartseg.runtime.errors import HeartsegWarning

    check_outputs([old, *scans], [("NEW", new)])
    if new.exists() and not overwrite:
        raise HeartsegError(f"NEW {new}: exists (use --overwrite to replace it)")
    _check_scans(scans)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HeartsegWarning)
        proto = upgraded(old)
        new.parent.mkdir(parents=True, exist_ok=True)
        # Only a file that was fully checked (and matched the reference on the given scans) appears at NEW.
        with atomic_output(new) as tmp:
            write_model(proto, tmp)
            results = check_graph_parity(old, tmp, scans, threads)
    for message in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, HeartsegWarning)):
        console.print(f"warning: {message}", soft_wrap=True)
    _print_parity(console, results)
    console.print(f"wrote {new} ({new.stat().st_size / 1e6:.1f} MB): the pipeline around the networks of {old}")


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


def _variants(console, model, output: Path, networks: Path, data: list[Path], fp16: bool, int8: bool,
              threads: int | None) -> None:
    """Write the requested variants of the networks, each wrapped in the pipeline graph, and report each one's
    held-out Dice through its graph beside the fp32 file's."""
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
        path = make_fp16(networks, output.with_suffix(".fp16.onnx"))
        reports.append(record_metrics(compare("fp16", output, path, val_cases, dice_fp32, threads)))
    if int8:
        train_cases = [prepare_case(by_id[i], model.contract, default_cache_root()) for i in train_ids]
        path = make_int8(networks, output.with_suffix(".int8.onnx"), calibration_feeds(model.contract, train_cases))
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
