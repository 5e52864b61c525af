"""The refusal of scans no model could use: the learned voxel sizes and fields of view widened by QCConfig's
refusal factors; the stages' spacings and patch sizes for a model without them; heartseg-infer's exit 2 with one
line, before any voxel is read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from heartseg.runtime.cli_infer import app as infer_app
from heartseg.runtime.contract import ModelContract, StageContract
from heartseg.runtime.qc import Plausibility, QCConfig, max_fov_mm, refusal_reason, spacing_bounds
from heartseg.runtime.session import read_contract
from onnx_models import build_test_model, make_scan

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "heartseg-la.onnx"
CONFIG = QCConfig()

# make_scan's scans: 1.4 x 1.2 x 1.6 mm voxels (its default affine), a field of view of about 58 mm.
SCAN_SHAPE = (40, 48, 36)

TINY_RANGES = dict(volume_ml=(1.0, 50.0), extent_mm=((5.0, 60.0), (5.0, 60.0), (5.0, 60.0)), cases=3)
# Learned ranges the test scans lie far outside of, while the stages' bounds (0.16-11 mm, 500 mm) hold them.
FINE_TRAINING = Plausibility(**TINY_RANGES, spacing_mm=((0.05, 0.1),) * 3, fov_mm=((20.0, 200.0),) * 3)
SMALL_TRAINING = Plausibility(**TINY_RANGES, spacing_mm=((0.5, 3.0),) * 3, fov_mm=((2.0, 5.0),) * 3)


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit 2, exactly one non-empty output line, starting with 'error:' and naming the problem."""
    assert result.exit_code == 2, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in " ".join(lines[0].split()), (fragment, lines[0])


@pytest.mark.parametrize("plausibility, reason", [(FINE_TRAINING, "outside what this model can segment"),
                                                  (SMALL_TRAINING, "larger than this model can plausibly be given")])
def test_infer_refuses_by_the_learned_ranges(tmp_path: Path, run_cli, plausibility: Plausibility,
                                             reason: str) -> None:
    model = build_test_model(tmp_path / "model.onnx", contract_fields={"plausibility": plausibility})
    scan, _ = make_scan(tmp_path / "scan.nii.gz", SCAN_SHAPE)
    out = tmp_path / "out"
    result = run_cli(infer_app, scan, "-o", out, "--model", model, "--threads", 1)
    assert_one_line_error(result, str(scan), reason)
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())
    # The same scan and stages without learned ranges are segmented.
    plain = build_test_model(tmp_path / "plain.onnx")
    assert run_cli(infer_app, scan, "-o", out, "--model", plain, "--threads", 1).exit_code in (0, 3)


# Stages at 2 mm with 64-voxel patches: the stages' bounds are 0.25-16 mm and a field of view of 500 mm.
STAGE = StageContract("single", (2.0, 2.0, 2.0), (64, 64, 64), threshold=0.5)
LEARNED = Plausibility(**TINY_RANGES, spacing_mm=((0.3, 0.8), (0.3, 0.8), (0.3, 1.0)),
                       fov_mm=((30.0, 100.0), (40.0, 120.0), (40.0, 150.0)))
CONTRACT = ModelContract(stages=[STAGE], plausibility=LEARNED)


def test_the_learned_spacing_range_decides_not_the_stages() -> None:
    low, high = 0.3 / CONFIG.refusal_spacing_factor, 1.0 * CONFIG.refusal_spacing_factor
    assert spacing_bounds(CONTRACT) == pytest.approx((low, high))
    stage_low, stage_high = spacing_bounds(replace(CONTRACT, plausibility=None))
    assert stage_low > low * 1.1 and stage_high > high * 1.1  # the two bounds differ on both sides
    fine = (low * 1.1, low * 1.1, low * 1.1)  # refused by the stages' bounds, accepted by the learned range
    assert refusal_reason((200, 200, 200), fine, replace(CONTRACT, plausibility=None)) is not None
    assert refusal_reason((200, 200, 200), fine, CONTRACT) is None
    coarse = (1.0, 1.0, high * 1.1)  # accepted by the stages' bounds, refused by the learned range
    assert refusal_reason((64, 64, 8), coarse, replace(CONTRACT, plausibility=None)) is None
    reason = refusal_reason((64, 64, 8), coarse, CONTRACT)
    assert reason == (f"voxel spacing 1 x 1 x {high * 1.1:.4g} mm is outside what this model can segment "
                      f"({low:.3g} to {high:.3g} mm per axis)")


def test_the_learned_field_of_view_decides_not_the_stages() -> None:
    largest = 150.0 * CONFIG.refusal_fov_factor
    assert max_fov_mm(CONTRACT) == pytest.approx(largest)
    assert max_fov_mm(replace(CONTRACT, plausibility=None)) > largest * 1.1
    shape = (int(largest * 1.1), 100, 80)  # at 1 mm: accepted by the stages' bound, refused by the learned one
    assert refusal_reason(shape, (1.0, 1.0, 1.0), replace(CONTRACT, plausibility=None)) is None
    reason = refusal_reason(shape, (1.0, 1.0, 1.0), CONTRACT)
    assert reason == (f"field of view {shape[0]} x 100 x 80 mm ({shape[0]} x 100 x 80 voxels) is larger than this "
                      f"model can plausibly be given (at most {largest:.0f} mm per axis)")
    assert refusal_reason((int(largest * 0.9), 100, 80), (1.0, 1.0, 1.0), CONTRACT) is None


def test_refusal_is_far_wider_than_review() -> None:
    assert CONFIG.refusal_spacing_factor > 1.0 and CONFIG.refusal_fov_factor > 1.0
    # Just outside the learned ranges a scan is reviewed (rules.py), not refused.
    assert refusal_reason((160, 160, 100), (1.2, 1.2, 1.5), CONTRACT) is None
    assert refusal_reason((200, 100, 80), (1.0, 1.0, 1.0), CONTRACT) is None


@pytest.mark.parametrize("plausibility", [None, replace(LEARNED, spacing_mm=None, fov_mm=None)],
                         ids=["no plausibility", "no learned geometry"])
def test_without_learned_geometry_the_stages_bound_the_scan(plausibility: Plausibility | None) -> None:
    contract = replace(CONTRACT, plausibility=plausibility)
    # The bounds heartseg-infer has always applied: 8 x the stage spacings, twice the largest patch, 500 mm.
    assert spacing_bounds(contract) == pytest.approx((2.0 / 8, 2.0 * 8))
    assert max_fov_mm(contract) == pytest.approx(max(500.0, 2 * 64 * 2.0))
    assert refusal_reason((20, 20, 20), (15.0, 15.0, 15.0), contract) is None
    assert "(0.25 to 16 mm per axis)" in refusal_reason((20, 20, 20), (17.0, 17.0, 17.0), contract)
    assert refusal_reason((490, 100, 100), (1.0, 1.0, 1.0), contract) is None
    assert "(at most 500 mm per axis)" in refusal_reason((510, 100, 100), (1.0, 1.0, 1.0), contract)


def test_the_shipped_model_is_bounded_by_its_learned_ranges() -> None:
    contract = read_contract(SHIPPED)[0]
    learned = contract.plausibility
    low, high = spacing_bounds(contract)
    assert low == pytest.approx(min(lo for lo, _ in learned.spacing_mm) / CONFIG.refusal_spacing_factor)
    assert high == pytest.approx(max(hi for _, hi in learned.spacing_mm) * CONFIG.refusal_spacing_factor)
    assert max_fov_mm(contract) == pytest.approx(max(hi for _, hi in learned.fov_mm) * CONFIG.refusal_fov_factor)
    # Thick slices of cine stacks (10 mm) and a whole chest (600 mm) are segmented and reviewed, not refused.
    assert refusal_reason((256, 256, 12), (1.4, 1.4, 10.0), contract) is None
    assert refusal_reason((400, 300, 100), (1.5, 1.5, 1.5), contract) is None
