"""QC of which way the atrium faces: a mask permuted or mirrored against its training family's atlas is caught and the
transform that undoes it named, a mask as given is not, families of other orientations stay familiar, and models
without atlases load and are judged as before."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from heartseg.runtime.contract import ContractError, ModelContract, StageContract, check_plausibility
from heartseg.runtime.qc import (
    RULES,
    OrientationAtlases,
    Plausibility,
    Standards,
    gather,
    judge,
    learn_orientation_atlases,
    orientation_evidence,
    scans_plausibility,
)
from heartseg.runtime.qc.orientation import (
    IDENTITY,
    ORIENTATION,
    TRANSFORMS,
    apply_transform,
    decode_atlas,
    encode_atlas,
    inverse_transform,
    shape_cube,
    transform_kind,
    transform_name,
    transformed_spacing,
)
from heartseg.runtime.qc.rules import unfamiliar_orientation

SPACING = (1.2, 1.2, 1.4)
SHAPE = (72, 72, 64)
# Atlases of a few synthetic shapes, for tests that need no more (the shipped rule wants ORIENTATION.min_cases).
FEW = dataclasses.replace(ORIENTATION, min_cases=2)
RANGES = dict(volume_ml=(5.0, 200.0), extent_mm=((10.0, 120.0), (10.0, 120.0), (10.0, 120.0)), cases=6)


def pear(seed: int, shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """An atrium-like shape with no symmetry: an ellipsoid of three different radii (mm), a bump off all three of
    its planes of symmetry and a tube along -x, each jittered by seed."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, spacing)], indexing="ij")
    radii = np.array([24.0, 16.0, 11.0]) * rng.uniform(0.9, 1.1, 3)
    body = sum((g / r) ** 2 for g, r in zip(grids, radii)) <= 1.0
    bump_at = np.array([14.0, 10.0, 7.0]) + rng.uniform(-1.5, 1.5, 3)
    bump = sum((g - c) ** 2 for g, c in zip(grids, bump_at)) <= (9.0 + rng.uniform(-1, 1)) ** 2
    tube = (grids[0] < -radii[0] + 4) & (grids[0] > -radii[0] - 12) & ((grids[1] + 5) ** 2 + (grids[2] - 3) ** 2 <= 16)
    return (body | bump | tube).astype(np.uint8)


@pytest.fixture(scope="module")
def atlases() -> OrientationAtlases:
    """One family's atlas, learned from six pears."""
    found = learn_orientation_atlases(((pear(seed), SPACING, "pears") for seed in range(6)), FEW)
    assert found is not None
    return found


def judged(mask: np.ndarray, atlases: OrientationAtlases, spacing=SPACING) -> tuple[list[str], list[str]]:
    plausibility = Plausibility(**RANGES, orientation_atlases=atlases)
    return judge(gather(mask, spacing, plausibility), Standards(plausibility), RULES)


def test_transforms_are_the_48_axis_permutations_and_flips_and_undo_each_other() -> None:
    assert len(set(TRANSFORMS)) == 48 and TRANSFORMS[0] == IDENTITY
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for transform in TRANSFORMS:
        moved = apply_transform(array, transform)
        assert np.array_equal(apply_transform(moved, inverse_transform(transform)), array)
        assert moved.shape == transformed_spacing(array.shape, transform)
    assert transform_name(((1, 0, 2), (False, False, True))) == "(y, x, -z)"
    assert transform_kind(((1, 0, 2), (False, False, False))) == "permuted"
    assert transform_kind(((0, 1, 2), (True, False, False))) == "mirrored"
    assert transform_kind(((2, 0, 1), (False, True, False))) == "permuted and mirrored"


def test_a_transformed_mask_fills_the_transformed_cube() -> None:
    mask = pear(0)
    cube = shape_cube(mask, SPACING)
    assert cube.shape == (24, 24, 24) and 0.0 < cube.max() <= 1.0
    for transform in TRANSFORMS:
        moved = shape_cube(apply_transform(mask, transform), transformed_spacing(SPACING, transform))
        assert np.abs(moved - apply_transform(cube, transform)).mean() < 0.02 * cube.mean()
    assert not shape_cube(np.zeros(SHAPE, np.uint8), SPACING).any()


def test_an_atlas_survives_its_text_form() -> None:
    cube = shape_cube(pear(1), SPACING)
    assert np.abs(decode_atlas(encode_atlas(cube)) - cube).max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="atlas"):
        decode_atlas("not base64!")


def test_a_new_member_as_given_is_familiar(atlases: OrientationAtlases) -> None:
    mask = pear(11)
    match = orientation_evidence(mask, SPACING, atlases)
    assert match is not None and match.as_given > match.best
    assert unfamiliar_orientation(gather(mask, SPACING, Plausibility(**RANGES, orientation_atlases=atlases)),
                                  Standards(Plausibility(**RANGES, orientation_atlases=atlases))) is None
    assert judged(mask, atlases) == ([], [])


def test_every_permuted_or_mirrored_copy_is_caught_and_the_transform_that_undoes_it_named(
        atlases: OrientationAtlases) -> None:
    mask = pear(12)
    for transform in TRANSFORMS[1:]:
        # The voxels moved, the header did not: the voxel sizes stay in the order the scan gave them.
        moved = np.ascontiguousarray(apply_transform(mask, transform))
        match = orientation_evidence(moved, SPACING, atlases)
        assert match is not None and match.gain > atlases.margin, transform_name(transform)
        assert match.transform == inverse_transform(transform), transform_name(transform)
        fails, reviews = judged(moved, atlases)
        assert not fails and len(reviews) == 1
        assert reviews[0].startswith(f"the atrium looks {transform_kind(match.transform)}: axes "
                                     f"{transform_name(inverse_transform(transform))} fit the trained shape better")


def test_the_evidence_is_recorded_in_the_measures(atlases: OrientationAtlases) -> None:
    plausibility = Plausibility(**RANGES, orientation_atlases=atlases)
    mirrored = np.ascontiguousarray(pear(13)[::-1])
    measures = gather(mirrored, SPACING, plausibility).measures()
    assert measures["orientation"]["transform"] == "(-x, y, z)" and measures["orientation"]["family"] == "pears"
    assert measures["orientation"]["best"] > measures["orientation"]["as_given"]
    assert gather(np.zeros(SHAPE, np.uint8), SPACING, plausibility).orientation is None


def test_a_family_in_another_orientation_is_familiar_and_each_family_names_its_own_transform() -> None:
    """Two datasets that disagree on which array axis is which: a mask matching either is familiar."""
    turned = ((2, 0, 1), (True, False, False))
    members = [(pear(seed), SPACING, "upright") for seed in range(5)]
    members += [(np.ascontiguousarray(apply_transform(pear(seed + 5), turned)), transformed_spacing(SPACING, turned),
                 "turned") for seed in range(5)]
    atlases = learn_orientation_atlases(members, FEW)
    assert atlases is not None and sorted(atlases.atlases) == ["turned", "upright"]
    upright, sideways = pear(21), np.ascontiguousarray(apply_transform(pear(22), turned))
    assert judged(upright, atlases) == ([], [])
    assert judged(sideways, atlases, transformed_spacing(SPACING, turned)) == ([], [])
    mirrored = np.ascontiguousarray(upright[:, ::-1])
    match = orientation_evidence(mirrored, SPACING, atlases)
    assert match is not None and match.gain > atlases.margin


def test_scans_plausibility_learns_an_atlas_per_family() -> None:
    cases = ORIENTATION.min_cases
    scans = [(pear(seed).astype(np.float32), pear(seed), SPACING) for seed in range(2 * cases)]
    learned = scans_plausibility(scans, families=["A"] * cases + ["B"] * cases)
    assert learned.orientation_atlases is not None and sorted(learned.orientation_atlases.atlases) == ["A", "B"]
    assert learned.orientation_atlases.margin >= 0.02
    assert scans_plausibility(scans).orientation_atlases is None
    assert dataclasses.replace(learned, orientation_atlases=None) == scans_plausibility(scans)


def test_a_family_of_too_few_labels_gets_no_atlas() -> None:
    """Its margin would rest on a handful of left-out labels: such a family is not judged, the others are."""
    few = [(pear(seed), SPACING, "few") for seed in range(ORIENTATION.min_cases - 1)]
    assert learn_orientation_atlases(few) is None
    many = [(pear(seed), SPACING, "many") for seed in range(ORIENTATION.min_cases)]
    learned = learn_orientation_atlases(few + many)
    assert learned is not None and sorted(learned.atlases) == ["many"]


def test_atlases_round_trip_through_the_contract_and_bad_ones_are_refused(atlases: OrientationAtlases) -> None:
    stage = StageContract("single", SPACING, (64, 64, 64), threshold=0.5)
    contract = ModelContract(stages=[stage], plausibility=Plausibility(**RANGES, orientation_atlases=atlases))
    back = ModelContract.from_json(contract.to_json())
    assert back == contract and isinstance(back.plausibility.orientation_atlases, OrientationAtlases)
    data = json.loads(contract.to_json())["plausibility"]
    for edit in ({"atlases": {"pears": "AAAA"}}, {"margin": -1}, {"typical": {}}, {"atlases": "pears"},
                 {"shape": 3}):
        with pytest.raises(ContractError, match=r"plausibility\.orientation_atlases"):
            check_plausibility({**data, "orientation_atlases": {**data["orientation_atlases"], **edit}})


def test_a_model_without_atlases_loads_and_is_judged_as_before() -> None:
    older = {key: list(value) if isinstance(value, tuple) else value for key, value in RANGES.items()}
    plausibility = check_plausibility(older)
    assert plausibility is not None and plausibility.orientation_atlases is None
    assert Plausibility.from_dict(json.loads(json.dumps(older))).orientation_atlases is None
    mirrored = np.ascontiguousarray(pear(14)[::-1])
    evidence = gather(mirrored, SPACING, plausibility)
    assert evidence.orientation is None and "orientation" not in evidence.measures()
    assert judge(evidence, Standards(plausibility), RULES) == ([], [])
