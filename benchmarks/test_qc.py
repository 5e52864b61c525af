"""QC benchmark: does the verdict catch wrong masks? Held-out scans and copies of them, each with its true Dice.

The held-out scans are the model's own (metadata info.val_cases: its fold never trained on them),
found in the MSD folders of $HEARTSEG_QC_DATA (comma-separated; default ../shared/data/Task02_Heart and
../shared/data/LA2018; $HEARTSEG_QC_CASES=N keeps the first N). Each gets a copy in every family of
qclib: the clean variants (qclib.CLEAN_VARIANTS) and the corruptions (qclib.CORRUPTIONS); scans of a
dataset the model did not train on are added as "other_dataset" ($HEARTSEG_QC_OTHER per dataset,
default 4). Reported: AUROC of the score for true Dice < 0.85, Spearman of estimated (or raw) against
true Dice, false alarms on clean scans and clean variants, silent failures (true Dice < 0.80, verdict
ok), QC's share of the time per scan, the same per family, and leave-one-family-out (the score
calibration and its review threshold refitted without the family they judge); with test-time flips
($HEARTSEG_QC_TTA=0 skips them) the same, their cost and their Dice gain. $HEARTSEG_QC_JSON=FILE writes
every row. Tiny mode: two synthetic scans and the pointwise model.
"""

from __future__ import annotations

import itertools
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
def qc_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[qclib.QCCase], list[qclib.QCCase]]:
    """The model, the clean held-out cases (their copies are made as they are segmented) and the other datasets'."""
    if benchlib.TINY:
        pytest.importorskip("onnx", reason="onnx is needed to build the tiny model (pip install onnx)")
        model, clean = _tiny_setup(tmp_path_factory.mktemp("qc-tiny"))
        return model, clean, []
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
    others: list[qclib.QCCase] = []
    trained_roots = {root for root in roots if qclib.find_cases(val_ids + train_ids, [root])}
    for root in roots:
        if root in trained_roots:
            continue
        names = sorted(p.name.split(".nii")[0] for p in (root / "imagesTr").iterdir() if ".nii" in p.name)
        other = qclib.find_cases(names[: benchlib.env_int("HEARTSEG_QC_OTHER", 4)], [root])
        for name, (image, label) in sorted(other.items()):
            case = qclib.load_case(name, image, label)
            case.corruption = "other_dataset"
            others.append(case)
    return model, clean, others


def _show(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _report_families(section: str, families: dict[str, dict]) -> None:
    """One line per family: cases, mean true Dice, bad masks, silent failures, verdicts, false alarms."""
    benchlib.report(section, f"{'family':<18} cases  Dice   bad  silent  ok/review/fail  false alarms (Dice >= "
                             f"{qclib.BAD_BELOW})")
    for kind, f in families.items():
        alarms = f"{_show(f['false_alarm_rate'], 2)} of {f['clean_good']}" if "false_alarm_rate" in f else ""
        refused = f"  ({f['refused']} refused)" if f["refused"] else ""
        verdicts = f"{f['ok']:>4}/{f['review']}/{f['fail']:<7}"
        benchlib.report(section, f"{kind:<18} {f['cases']:>5}  {_show(f['mean_dice'])}  {f['bad']:>3}  "
                                 f"{f['silent_failures']:>6}  {verdicts}  {alarms}{refused}")


def _report_held_out(section: str, result: dict) -> None:
    """Leave-one-family-out: each held-out family's threshold, silent failures and flags, then the totals."""
    benchlib.report(section, f"{'held-out family':<18} threshold  silent  flagged  ok/review/fail  false alarms")
    for kind, f in result["families"].items():
        alarms = f"{_show(f['false_alarm_rate'], 2)} of {f['clean_good']}" if "false_alarm_rate" in f else ""
        verdicts = f"{f['ok']:>4}/{f['review']}/{f['fail']:<7}"
        benchlib.report(section, f"{kind:<18} {f['threshold']:>9.2f}  {f['silent_failures']:>6}  "
                                 f"{_show(f['flagged_share'], 2):>7}  {verdicts}  {alarms}")
    total = result["held_out"]
    benchlib.report(section, f"all held out: {total['cases']} cases, AUROC(score) {_show(total['auroc_score'])}  "
                             f"AUROC(held-out estimate) {_show(total['auroc_estimated'])}  AUROC(verdict) "
                             f"{_show(total['auroc_verdict'])}  AUROC(order) {_show(total['auroc_order'])}  "
                             f"silent failures {total['silent_failures']}  clean "
                             f"false alarms {_show(total['false_alarm_rate_clean_good'], 2)} of "
                             f"{total['clean_good']}  thresholds {total['thresholds']}")
    study = result["combination"]
    benchlib.report(section, f"every measure combined by a logistic regression fitted on the rows ({study['cases']} "
                             f"cases): AUROC in sample {_show(study['auroc_in_sample'])}, each family held out of "
                             f"the fit {_show(study['auroc_held_out'])}; the score alone {_show(study['auroc_score'])}")


def _run(benchmark, model: Path, clean: list[qclib.QCCase], others: list[qclib.QCCase], tta: bool) -> None:
    key = "tta" if tta else "default"
    benchmark.group = "QC"
    threads = max(benchlib.thread_counts())
    segmenter = Segmenter(model, device="cpu", threads=threads, tta=tta)
    first = clean[0]
    seconds, predictions = benchlib.measure(benchmark, lambda: segmenter.segment(first.volume), benchlib.rounds(3))
    SECONDS[key] = benchlib.median(seconds)
    qc_seconds = benchlib.median([p.report.seconds for p in predictions])
    rows = [qclib.run_case(segmenter, case) for case in itertools.chain(qclib.corrupted(clean), others)]
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
    families = qclib.per_family(rows)
    held_out = qclib.leave_one_family_out(rows)
    held_out["combination"] = qclib.combination_study(rows)
    benchmark.extra_info.update({"mode": key, "threads": threads, "figures": figures, "per_family": families,
                                 "leave_one_family_out": {k: held_out[k] for k in ("families", "held_out",
                                                                                   "combination")}})
    out = os.environ.get("HEARTSEG_QC_JSON")
    if out:
        path = Path(out).with_suffix(f".{key}.json")
        path.write_text(json.dumps({"model": str(model), "mode": key, "figures": figures, "per_family": families,
                                    "leave_one_family_out": held_out, "rows": [asdict(r) for r in rows]}, indent=1))
    benchlib.report(f"QC ({key})", f"{figures['cases']} cases ({figures['clean']} clean, {figures['bad']} with true "
                                   f"Dice < {qclib.BAD_BELOW}), verdicts {figures['verdicts']}")
    benchlib.report(f"QC ({key})", f"AUROC(score, Dice<{qclib.BAD_BELOW}) {_show(figures['auroc_score_bad'])}  "
                                   f"AUROC(verdict) {_show(figures['auroc_verdict_bad'])}  AUROC(QC's order: "
                                   f"verdict, then estimate) {_show(figures['auroc_order_bad'])}  Spearman "
                                   f"{_show(figures['spearman'])} ({figures['spearman_of']})  mean |est - true| "
                                   f"{_show(figures['mean_abs_error'])}")
    benchlib.report(f"QC ({key})", f"flagged clean scans and clean variants "
                                   f"{_show(figures['false_alarm_rate_clean'], 2)} (of those with true Dice >= "
                                   f"{qclib.BAD_BELOW}: {_show(figures['false_alarm_rate_clean_good'], 2)}, "
                                   f"{figures['clean_good']} scans)  "
                                   f"silent failures {figures['silent_failures']}  QC {1000 * qc_seconds:.1f} ms of "
                                   f"{SECONDS[key]:.3f} s per scan ({100 * figures['qc_share_of_time']:.1f} %)")
    if "tta_cost_ratio" in figures:
        benchlib.report(f"QC ({key})", f"test-time flips: {figures['tta_cost_ratio']:.1f}x the time, mean Dice "
                                       f"{figures['tta_dice_gain']:+.4f}")
    _report_families(f"QC ({key}) per family", families)
    _report_held_out(f"QC ({key}) leave one family out", held_out)
    assert len(rows) == len(clean) * (1 + len(qclib.FAMILIES)) + len(others)
    assert all(0.0 <= r.true_dice <= 1.0 and r.verdict in VERDICTS and r.rule_verdict in VERDICTS for r in rows)
    assert figures["false_alarm_rate_clean"] is not None and 0.0 < figures["qc_share_of_time"] < 1.0
    assert list(held_out["families"]) == list(families) and held_out["held_out"]["cases"] == len(rows)


def test_qc_default(benchmark, qc_setup) -> None:
    """The default QC: verdicts and estimated Dice against the true Dice, and its share of the time per scan."""
    model, clean, others = qc_setup
    _run(benchmark, model, clean, others, tta=False)


def test_qc_tta(benchmark, qc_setup) -> None:
    """The same with test-time flips (4 inferences per scan)."""
    if os.environ.get("HEARTSEG_QC_TTA", "1").strip() == "0":
        pytest.skip("HEARTSEG_QC_TTA=0")
    model, clean, others = qc_setup
    _run(benchmark, model, clean, others, tta=True)
