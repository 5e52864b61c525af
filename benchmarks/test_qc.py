"""QC benchmark: does the verdict catch wrong masks? Held-out scans and corrupted copies, each with its true Dice.

The held-out scans are the model's own (metadata info.val_cases: its fold never trained on them),
found in the MSD folders of $HEARTSEG_QC_DATA (comma-separated; default ../shared/data/Task02_Heart and
../shared/data/LA2018). Each gets the corruptions of qclib.CORRUPTIONS; scans of a dataset the model
did not train on are added as "other_dataset" ($HEARTSEG_QC_OTHER per dataset, default 4). Reported:
AUROC of the score for true Dice < 0.85, Spearman of estimated (or raw) against true Dice, false alarms
on clean scans, silent failures (true Dice < 0.80, verdict ok), QC's share of the time per scan; with
test-time flips ($HEARTSEG_QC_TTA=0 skips them) the same, their cost and their Dice gain.
$HEARTSEG_QC_JSON=FILE writes every row. Tiny mode: two synthetic scans and the pointwise model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import benchlib
import numpy as np
import pytest
import qclib
from heartseg.runtime.qc import VERDICTS
from heartseg.runtime.segmenter import Segmenter

pytestmark = pytest.mark.benchmark_suite

ROWS: dict[str, list[qclib.QCRow]] = {}
SECONDS: dict[str, float] = {}


def _roots() -> list[Path]:
    env = os.environ.get("HEARTSEG_QC_DATA", "").strip()
    if env:
        return [Path(p) for p in env.split(",") if p.strip()]
    shared = benchlib.REPO_ROOT.parent / "shared" / "data"
    found = benchlib.data_dir()
    return [p for p in dict.fromkeys([found or shared / "Task02_Heart", shared / "LA2018"]) if (p / "imagesTr").is_dir()]


def _tiny_setup(folder: Path) -> tuple[Path, list[qclib.QCCase]]:
    """Two synthetic scans, and the pointwise model with plausibility and a calibration learned from them."""
    import sys

    if str(benchlib.TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(benchlib.TESTS_DIR))
    from heartseg.runtime.qc import fit_score_calibration, scans_plausibility
    from onnx_models import TEST_MODEL_BIAS, build_test_model, make_scan

    cases = []
    for i in range(2):
        scan, label = make_scan(folder / f"tiny_{i}.nii.gz", seed=i, label_path=folder / "labels" / f"tiny_{i}.nii.gz")
        cases.append(qclib.load_case(f"tiny_{i}", scan, label))
    plausibility = scans_plausibility((c.volume.data, c.label, c.volume.spacing) for c in cases)
    plain = build_test_model(folder / "plain.onnx", bias=TEST_MODEL_BIAS, contract_fields={"plausibility": plausibility})
    rows = [qclib.run_case(Segmenter(plain, device="cpu", threads=1), c) for c in cases]
    calibration = fit_score_calibration([r.score for r in rows], [r.true_dice for r in rows])
    model = build_test_model(folder / "qc.onnx", bias=TEST_MODEL_BIAS,
                             contract_fields={"plausibility": plausibility, "score_calibration": calibration})
    return model, cases


@pytest.fixture(scope="module")
def qc_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[qclib.QCCase]]:
    """The model and every case (clean held-out, corrupted, other dataset)."""
    if benchlib.TINY:
        pytest.importorskip("onnx", reason="onnx is needed to build the tiny model (pip install onnx)")
        model, clean = _tiny_setup(tmp_path_factory.mktemp("qc-tiny"))
        return model, qclib.corrupted(clean)
    from heartseg.runtime.errors import ModelError
    from heartseg.runtime.segmenter import default_model_path
    from heartseg.runtime.session import read_contract

    env = os.environ.get("HEARTSEG_BENCH_MODEL")
    try:
        model = Path(env) if env else default_model_path()
    except ModelError as exc:
        pytest.skip(f"no model: {exc}")
    contract, _ = read_contract(model)
    val_ids = [c for c in contract.info.get("val_cases", "").split(",") if c]
    train_ids = [c for c in contract.info.get("train_cases", "").split(",") if c]
    if not val_ids:
        pytest.skip(f"{model}: its metadata names no held-out cases (info.val_cases)")
    roots = _roots()
    found = qclib.find_cases(val_ids, roots)
    if not found:
        pytest.skip(f"none of the model's held-out cases is in {', '.join(map(str, roots)) or 'no data folder'}")
    limit = benchlib.env_int("HEARTSEG_QC_CASES", 0)
    ids = sorted(found)[:limit] if limit else sorted(found)
    clean = [qclib.load_case(i, *found[i]) for i in ids]
    cases = qclib.corrupted(clean)
    trained_roots = {root for root in roots if qclib.find_cases(val_ids + train_ids, [root])}
    for root in roots:
        if root in trained_roots:
            continue
        names = sorted(p.name.split(".nii")[0] for p in (root / "imagesTr").iterdir() if ".nii" in p.name)
        other = qclib.find_cases(names[: benchlib.env_int("HEARTSEG_QC_OTHER", 4)], [root])
        for name, (image, label) in sorted(other.items()):
            case = qclib.load_case(name, image, label)
            case.corruption = "other_dataset"
            cases.append(case)
    return model, cases


def _run(benchmark, model: Path, cases: list[qclib.QCCase], tta: bool) -> None:
    key = "tta" if tta else "default"
    benchmark.group = "QC"
    threads = max(benchlib.thread_counts())
    segmenter = Segmenter(model, device="cpu", threads=threads, tta=tta)
    first = cases[0]
    seconds, predictions = benchlib.measure(benchmark, lambda: segmenter.segment(first.volume), benchlib.rounds(3))
    SECONDS[key] = benchlib.median(seconds)
    qc_seconds = benchlib.median([p.report.seconds for p in predictions])
    rows = [qclib.run_case(segmenter, case) for case in cases]
    ROWS[key] = rows
    figures = qclib.qc_figures(rows)
    figures["seconds_per_scan"] = SECONDS[key]
    figures["qc_seconds"] = qc_seconds
    figures["qc_share_of_time"] = qc_seconds / SECONDS[key]
    if tta and "default" in ROWS:
        plain = {(r.name, r.corruption): r.true_dice for r in ROWS["default"]}
        figures["tta_cost_ratio"] = SECONDS[key] / SECONDS["default"]
        figures["tta_dice_gain"] = float(np.mean([r.true_dice - plain[(r.name, r.corruption)] for r in rows
                                                  if (r.name, r.corruption) in plain]))
    benchmark.extra_info.update({"mode": key, "threads": threads, "figures": figures,
                                 "per_corruption": qclib.per_corruption(rows)})
    out = os.environ.get("HEARTSEG_QC_JSON")
    if out:
        path = Path(out).with_suffix(f".{key}.json")
        path.write_text(json.dumps({"model": str(model), "mode": key, "figures": figures,
                                    "per_corruption": qclib.per_corruption(rows),
                                    "rows": [asdict(r) for r in rows]}, indent=1))

    def show(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    benchlib.report(f"QC ({key})", f"{figures['cases']} cases ({figures['clean']} clean, {figures['bad']} with true "
                                   f"Dice < {qclib.BAD_BELOW}), verdicts {figures['verdicts']}")
    benchlib.report(f"QC ({key})", f"AUROC(score, Dice<{qclib.BAD_BELOW}) {show(figures['auroc_score_bad'])}  "
                                   f"AUROC(verdict) {show(figures['auroc_verdict_bad'])}  Spearman "
                                   f"{show(figures['spearman'])} ({figures['spearman_of']})  mean |est - true| "
                                   f"{show(figures['mean_abs_error'])}")
    benchlib.report(f"QC ({key})", f"flagged clean scans {show(figures['false_alarm_rate_clean'], 2)} (of those with "
                                   f"true Dice >= {qclib.BAD_BELOW}: {show(figures['false_alarm_rate_clean_good'], 2)}"
                                   f", {figures['clean_good']} scans)  "
                                   f"silent failures {figures['silent_failures']}  QC {1000 * qc_seconds:.1f} ms of "
                                   f"{SECONDS[key]:.3f} s per scan ({100 * figures['qc_share_of_time']:.1f} %)")
    if "tta_cost_ratio" in figures:
        benchlib.report(f"QC ({key})", f"test-time flips: {figures['tta_cost_ratio']:.1f}x the time, mean Dice "
                                       f"{figures['tta_dice_gain']:+.4f}")
    for kind, values in qclib.per_corruption(rows).items():
        benchlib.report(f"QC ({key}) per corruption", f"{kind}: {values}")
    assert len(rows) == len(cases)
    assert all(0.0 <= r.true_dice <= 1.0 and r.verdict in VERDICTS for r in rows)
    assert figures["false_alarm_rate_clean"] is not None and 0.0 < figures["qc_share_of_time"] < 1.0


def test_qc_default(benchmark, qc_setup) -> None:
    """The default QC: verdicts and estimated Dice against the true Dice, and its share of the time per scan."""
    model, cases = qc_setup
    _run(benchmark, model, cases, tta=False)


def test_qc_tta(benchmark, qc_setup) -> None:
    """The same with test-time flips (4 inferences per scan)."""
    if os.environ.get("HEARTSEG_QC_TTA", "1").strip() == "0":
        pytest.skip("HEARTSEG_QC_TTA=0")
    model, cases = qc_setup
    _run(benchmark, model, cases, tta=True)
