"""heartseg-eval: compare predicted masks with reference labels."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table
from rich.text import Text

from .atomic import write_text_atomic
from .cli_common import (
    EXIT_FLAGGED,
    EXIT_OK,
    case_key,
    check_report_path,
    fmt,
    guarded,
    index_by_key,
    new_app,
    nifti_files,
    out_console,
    say,
    version_option,
    warn,
    write_json,
)
from .errors import InputError
from .formats import scan_name
from .formats.nifti import load_label
from .image import same_grid, voxel_volume_mm3
from .memory import check_eval_budget
from .outputs import check_outputs
from .metrics import SegmentationMetrics, compute_metrics, summarize
from .naming import find_label
from .qc import SILENT_BELOW, mask_flag, spearman

app = new_app()

PRED_SUFFIXES = ("_mask",)
METRIC_COLUMNS = ("dice", "iou", "precision", "recall", "hd95_mm", "assd_mm", "volume_pred_ml", "volume_ref_ml")


@dataclass
class Case:
    """One evaluated prediction."""

    name: str
    pred: Path
    gt: Path
    metrics: SegmentationMetrics
    flag: str | None
    qc: dict | None = None  # heartseg-infer's QC record of this prediction, when a report was given


def pair_cases(pred: Path, gt: Path) -> tuple[list[tuple[str, Path, Path]], list[Path], list[Path]]:
    """(name, prediction, label) pairs, predictions without a label, labels without a prediction.

    Two files: one pair. Two folders: files paired by name, X_mask.nii.gz (or X.nii.gz) with X.nii.gz,
    and nnU-Net's X_0000_mask.nii.gz (or X_0000.nii.gz) with X.nii.gz;
    probability maps (*_prob) in the prediction folder are ignored.
    """
    for path, what in ((pred, "PRED"), (gt, "GT")):
        if not path.exists():
            raise InputError(f"{what} {path}: no such file or folder")
    if pred.is_file() and gt.is_file():
        return [(case_key(gt), pred, gt)], [], []
    if not (pred.is_dir() and gt.is_dir()):
        raise InputError(f"PRED {pred} and GT {gt}: give two files or two folders")
    preds = [p for p in nifti_files(pred) if not scan_name(p).endswith("_prob")]
    pred_index = index_by_key(preds, PRED_SUFFIXES, what="prediction")
    gt_index = index_by_key(nifti_files(gt), what="label")
    matches = {key: find_label(gt_index, key) for key in sorted(pred_index)}
    pairs = [(case_key(found), pred_index[key], found) for key, found in matches.items() if found is not None]
    unmatched_pred = [pred_index[key] for key, found in matches.items() if found is None]
    paired = {found for found in matches.values() if found is not None}
    unmatched_gt = [gt_index[key] for key in sorted(gt_index) if gt_index[key] not in paired]
    if not pairs:
        raise InputError(f"no prediction in {pred} has a label of the same name in {gt} "
                         f"({len(preds)} predictions, {len(gt_index)} labels)")
    return pairs, unmatched_pred, unmatched_gt


def evaluate_pair(name: str, pred_path: Path, gt_path: Path, max_fraction: float | None,
                  label_value: float | None = None) -> Case:
    """Load one prediction and its label, check they share a grid, and compute the metrics."""
    pred = load_label(pred_path, what="prediction", check=lambda g: check_eval_budget(g, pred_path))
    gt = load_label(gt_path, label_value, check=lambda g: check_eval_budget(g, gt_path))
    if not same_grid(pred, gt):
        what = "shapes" if pred.shape != gt.shape else "affines"
        raise InputError(f"prediction {pred_path} (shape {pred.shape}) and label {gt_path} (shape {gt.shape}) "
                         f"are not on the same grid: their {what} differ")
    metrics = compute_metrics(pred.data, gt.data, gt.spacing, voxel_volume_mm3(gt.affine))
    return Case(name, pred_path, gt_path, metrics, mask_flag(pred.data, None, None, max_fraction))


def check_label_value(value: float | None) -> None:
    """Refuse a --label-value no voxel can equal (NaN) or that no label map holds (infinite)."""
    if value is not None and not math.isfinite(value):
        raise InputError(f"--label-value {value:g}: give a finite number, the value of the structure in the label "
                         "map (e.g. 1)")


def read_qc_report(path: Path) -> dict[str, dict]:
    """heartseg-infer's --json report: {scan name: its QC record (verdict, estimated Dice, interval)}."""
    try:
        data = json.loads(path.read_text())
        scans = data["scans"]
        return {str(s["name"]): s.get("qc_report") or {} for s in scans if s.get("name")}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"--qc-report {path}: not a heartseg-infer JSON report ({exc})") from None


def qc_agreement(cases: list[Case], bad_below: float = SILENT_BELOW) -> dict[str, float | int | None]:
    """Estimated against true Dice over the cases with an estimate: error, interval coverage, Spearman,
    and silent failures (true Dice below bad_below with the verdict ok)."""
    rows = [(c.qc["estimated_dice"], c.qc["dice_interval"], c.qc.get("verdict"), c.metrics.dice)
            for c in cases if c.qc and c.qc.get("estimated_dice") is not None]
    verdicts = [(c.qc.get("verdict"), c.metrics.dice) for c in cases if c.qc]
    out: dict[str, float | int | None] = {
        "cases": len(rows), "mean_abs_error": None, "interval_coverage": None, "spearman": None,
        "silent_failures": sum(v == "ok" and d < bad_below for v, d in verdicts), "bad_below": bad_below}
    if rows:
        import numpy as np

        est = np.array([r[0] for r in rows], float)
        true = np.array([r[3] for r in rows], float)
        out["mean_abs_error"] = float(np.mean(np.abs(est - true)))
        out["interval_coverage"] = float(np.mean([lo <= d <= hi for (_, (lo, hi), _, d) in rows]))
        out["spearman"] = spearman(est, true)
    return out


def _table(cases: list[Case], mean: dict[str, float]) -> Table:
    table = Table(title=f"heartseg-eval  {len(cases)} case{'s' if len(cases) != 1 else ''}", title_justify="left")
    with_qc = any(c.qc for c in cases)
    for column in ("case", "Dice", "IoU", "precision", "recall", "HD95 mm", "ASSD mm", "pred mL", "ref mL", "QC"):
        table.add_column(column, justify="left" if column in ("case", "QC") else "right")
    if with_qc:
        table.add_column("est. Dice [interval]", justify="right")
        table.add_column("verdict")

    def cells(values: dict[str, float]) -> list[str]:
        return [fmt(values["dice"]), fmt(values["iou"]), fmt(values["precision"]), fmt(values["recall"]),
                fmt(values["hd95_mm"], 2), fmt(values["assd_mm"], 2), fmt(values["volume_pred_ml"], 1),
                fmt(values["volume_ref_ml"], 1)]

    for case in cases:
        qc = Text("ok", style="green") if case.flag is None else Text(f"FLAG: {case.flag}", style="bold red")
        extra = []
        if with_qc:
            record = case.qc or {}
            interval = record.get("dice_interval")
            estimate = record.get("estimated_dice")
            extra = [f"{estimate:.2f} [{interval[0]:.2f}-{interval[1]:.2f}]" if estimate is not None and interval
                     else "n/a", record.get("verdict") or "n/a"]
        table.add_row(Text(case.name), *cells(case.metrics.__dict__), qc, *extra)
    flagged = sum(c.flag is not None for c in cases)
    table.add_section()
    table.add_row(Text("mean", style="bold"), *cells(mean),
                  Text(f"{flagged} flagged", style="bold red") if flagged else "", *([""] * 2 if with_qc else []))
    return table


def _csv(cases: list[Case]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "pred", "gt", *METRIC_COLUMNS, "flag", "estimated_dice", "verdict"])
    for case in cases:
        values = case.metrics.to_dict()
        qc = case.qc or {}
        estimate = qc.get("estimated_dice")
        writer.writerow([case.name, case.pred, case.gt,
                         *("" if values[k] is None else repr(values[k]) for k in METRIC_COLUMNS), case.flag or "",
                         "" if estimate is None else repr(estimate), qc.get("verdict") or ""])
    return buffer.getvalue()


HELP = """Compare predicted masks with reference labels: Dice, IoU, precision, recall, HD95 and ASSD (mm),
and both volumes (mL).

PRED and GT are two NIfTI files, or two folders. Folders are paired by file name: a prediction
X.nii.gz or X_mask.nii.gz (as heartseg-infer writes it) pairs with the label X.nii.gz; *_prob files
are ignored; predictions without a label are reported and left out. Labels without a prediction stop
the tool with exit code 2, listing them, unless --allow-missing (then they are listed in the JSON
under "missing_predictions"). Masks must hold only 0 and 1; a label with other values (a
multi-class label map) is refused unless --label-value V says which value is the foreground; a label
that holds no voxel equal to V stops the tool with exit code 2, naming the values it holds. Each
prediction must lie on its label's grid (same shape and affine), otherwise the tool stops with exit
code 2 naming both files. Volumes use the voxel volume of the label's affine (|det|).

Distances are in mm from the label's voxel size. HD95 is the larger of the two directed 95th
percentile surface distances; ASSD is the mean over both directed distance sets. Empty masks: both
empty gives Dice = IoU = precision = recall = 1 and HD95 = ASSD = 0; exactly one empty gives Dice =
IoU = precision = recall = 0 and HD95 = ASSD = n/a (null in JSON, empty in CSV). The mean row ignores
n/a values.

A prediction that is empty, all foreground or covers more than --max-fraction of its scan is
flagged: a "FLAG" row in the table, a warning line, and exit code 3.

With --qc-report FILE (the --json report heartseg-infer wrote for these predictions), each case also
shows heartseg's estimated Dice, its interval and the QC verdict, paired by scan name; a summary line
compares them with the true Dice: mean absolute error, share of true Dice inside the interval,
Spearman correlation, and silent failures (true Dice below 0.80 with the verdict ok).

Exit codes: 0 all cases evaluated and none flagged; 2 usage or input error (missing or unreadable
file, grids that differ, nothing to pair, labels without a prediction, a non-binary mask, a report
path that is one of the inputs, a --qc-report that is not heartseg-infer's JSON, a --label-value that is
not finite or that a label does not hold); 3 at least one
prediction flagged as degenerate.
"""


@app.command(help=HELP, no_args_is_help=True)
@guarded
def evaluate(
    pred: Path = typer.Argument(..., metavar="PRED", help="Predicted mask, or a folder of them.", show_default=False),
    gt: Path = typer.Argument(..., metavar="GT", help="Reference label, or a folder of them.", show_default=False),
    json_path: Optional[Path] = typer.Option(
        None, "--json", metavar="FILE",
        help="Write every case and the mean as JSON (NaN as null). [default: none]", show_default=False),
    csv_path: Optional[Path] = typer.Option(
        None, "--csv", metavar="FILE", help="Write one CSV row per case. [default: none]", show_default=False),
    max_fraction: Optional[float] = typer.Option(
        None, "--max-fraction", min=0.0, max=1.0, metavar="F",
        help="Also flag a prediction covering more than this fraction of its scan (the atrium's share differs "
             "widely between datasets, so by default only empty and all-foreground predictions are flagged). "
             "[default: none]", show_default=False),
    qc_report: Optional[Path] = typer.Option(
        None, "--qc-report", metavar="FILE",
        help="heartseg-infer's --json report of these predictions: compare its estimated Dice with the true one. "
             "[default: none]", show_default=False),
    allow_missing: bool = typer.Option(
        False, "--allow-missing", help="Evaluate the labels that have a prediction and list the others, instead of "
        "stopping with exit code 2 when some labels have none."),
    label_value: Optional[float] = typer.Option(
        None, "--label-value", metavar="V", help="Score the label voxels equal to V (for multi-class label maps); "
        "a label with no voxel equal to V is refused. [default: labels must hold only 0 and 1]", show_default=False),
    version: bool = version_option(),
) -> None:
    check_label_value(label_value)
    check_report_path(json_path, "--json")
    check_report_path(csv_path, "--csv")
    pairs, unmatched_pred, unmatched_gt = pair_cases(pred, gt)
    check_outputs([*(p for _, p, _ in pairs), *(g for _, _, g in pairs), *unmatched_pred, *unmatched_gt, qc_report],
                  [("--json", json_path), ("--csv", csv_path)])
    if unmatched_gt and not allow_missing:
        names = ", ".join(scan_name(p) for p in unmatched_gt[:10]) + (", ..." if len(unmatched_gt) > 10 else "")
        raise InputError(f"{len(unmatched_gt)} label(s) in {gt} have no prediction in {pred}: {names} "
                         "(--allow-missing evaluates the others)")
    records = read_qc_report(qc_report) if qc_report is not None else None
    for path in unmatched_pred:
        warn(f"{path}: no label of the same name in {gt}; not evaluated")
    if unmatched_gt:
        warn(f"{len(unmatched_gt)} label(s) in {gt} have no prediction and were not evaluated: "
             + ", ".join(scan_name(p) for p in unmatched_gt))
    cases = [evaluate_pair(name, p, g, max_fraction, label_value) for name, p, g in pairs]
    agreement = None
    if records is not None:
        for case in cases:
            case.qc = records.get(case_key(case.pred, PRED_SUFFIXES)) or records.get(case.name)
        agreement = qc_agreement(cases)
    mean = summarize([case.metrics for case in cases])
    out_console().print(_table(cases, mean))
    if agreement is not None:
        say(f"QC: estimated vs true Dice over {agreement['cases']} cases: mean |error| "
            f"{fmt(agreement['mean_abs_error'])}, inside the interval {fmt(agreement['interval_coverage'], 2)}, "
            f"Spearman {fmt(agreement['spearman'], 2)}; silent failures (true Dice < 0.80, verdict ok): "
            f"{agreement['silent_failures']}")
    flagged = [case for case in cases if case.flag is not None]
    for case in flagged:
        warn(f"{case.name}: degenerate prediction {case.pred} ({case.flag})")
    if json_path is not None:
        write_json(json_path, {
            "pred": str(pred),
            "gt": str(gt),
            "max_fraction": max_fraction,
            "n_cases": len(cases),
            "mean": mean,
            "flagged": [case.name for case in flagged],
            "unmatched_predictions": [str(p) for p in unmatched_pred],
            "missing_predictions": [str(p) for p in unmatched_gt],
            "label_value": label_value,
            "qc_vs_true": agreement,
            "cases": [{"case": c.name, "pred": str(c.pred), "gt": str(c.gt), **c.metrics.to_dict(), "flag": c.flag,
                       **({"qc": c.qc} if c.qc is not None else {})}
                      for c in cases],
        })
    if csv_path is not None:
        write_text_atomic(csv_path, _csv(cases))
    raise typer.Exit(EXIT_FLAGGED if flagged else EXIT_OK)


def main() -> None:
    """Entry point of heartseg-eval."""
    app(prog_name="heartseg-eval")


if __name__ == "__main__":
    main()
