"""Which way the atrium faces: a mask's shape against the training atria's under the 48 axis permutations and flips.

A scan whose voxel axes are permuted or mirrored without its header saying so reaches the model in an orientation it
never trained on, and nothing in the header tells. The mask tells: the atrium's shape (where the pulmonary veins,
the appendage and the mitral valve lie around its body) is not symmetric. Each training family (the dataset a
case came from: datasets need not agree on which array axis is left, anterior or superior) gets a probability atlas
of its atria: each label, in mm around its centroid, on a small cube whose voxel size grows with the cube root of the
atrium's volume (so that atria are compared by shape, not size), averaged over the family. A mask's cube is compared
with every atlas under every transform (Pearson correlation, over the correlation the family's own training labels
reach with its atlas, so that families of tighter or looser shapes compare alike); a mask that another transform fits
better than the as-given one by more than the margin learned on the training labels (each left out of its family's
atlas in turn) looks permuted or mirrored.
"""

from __future__ import annotations

import base64
import itertools
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np

from ..preprocess import mask_box

# (perm, flips): axis i of the transformed array is axis perm[i] of the given one, reversed where flips[i].
Transform = tuple[tuple[int, int, int], tuple[bool, bool, bool]]
IDENTITY: Transform = ((0, 1, 2), (False, False, False))
# Every permutation of the axes with every combination of flips, the identity first.
TRANSFORMS: tuple[Transform, ...] = tuple(
    (perm, flips) for perm in itertools.permutations(range(3))  # type: ignore[misc]
    for flips in itertools.product((False, True), repeat=3))
_ATLAS_SCALE = 255


@dataclass(frozen=True)
class OrientationConfig:
    """The atlas cube's grid, and the least margin a flag needs; the same in training and at run time."""

    grid: int = 24
    # The cube's voxel size (mm) for an atrium of reference_ml; it scales with the cube root of a mask's volume over
    # reference_ml, so that the cube spans about 96 mm around a 100 mL atrium and proportionally more or less around
    # a larger or smaller one.
    step_mm: float = 4.0
    reference_ml: float = 100.0
    # The learned margin is at least this: training labels that every other transform fits worse leave none.
    min_margin: float = 0.02
    # A family of fewer labels gets no atlas: the margin, the largest gain among its left-out labels, would rest on
    # too few of them (a handful of randomly oriented shapes would flag half the new ones).
    min_cases: int = 10


ORIENTATION = OrientationConfig()


def transform_name(transform: Transform) -> str:
    """'(y, x, -z)': which axis of the given array (negated when mirrored) each transformed axis is."""
    perm, flips = transform
    return "(" + ", ".join(("-" if flip else "") + "xyz"[axis] for axis, flip in zip(perm, flips)) + ")"


def transform_kind(transform: Transform) -> str:
    """'permuted', 'mirrored', 'permuted and mirrored' or 'as given'."""
    perm, flips = transform
    kinds = [word for word, applies in (("permuted", tuple(perm) != (0, 1, 2)), ("mirrored", any(flips))) if applies]
    return " and ".join(kinds) or "as given"


def apply_transform(array: np.ndarray, transform: Transform) -> np.ndarray:
    """The array with its axes permuted and reversed as transform says (a view)."""
    perm, flips = transform
    out = np.transpose(array, perm)
    axes = tuple(i for i, flip in enumerate(flips) if flip)
    return np.flip(out, axes) if axes else out


def inverse_transform(transform: Transform) -> Transform:
    """The transform that undoes transform."""
    perm, flips = transform
    back = tuple(int(i) for i in np.argsort(perm))
    return back, tuple(bool(flips[i]) for i in back)  # type: ignore[return-value]


def transformed_spacing(spacing: Iterable[float], transform: Transform) -> tuple[float, float, float]:
    """The voxel sizes of the transformed array's axes."""
    values = tuple(float(s) for s in spacing)
    return tuple(values[axis] for axis in transform[0])  # type: ignore[return-value]


def shape_cube(mask: np.ndarray, spacing: Iterable[float], config: OrientationConfig = ORIENTATION,
               bounds: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The share of each voxel of a grid^3 cube around the mask's centroid (voxel size scaled to its volume) that the
    mask covers; zeros for an empty mask. bounds, the mask's bounding box when the caller has it, saves finding it."""
    spacing = np.asarray(tuple(spacing), float)
    n = config.grid
    box = mask_box(mask) if bounds is None else bounds
    if box is None:
        return np.zeros((n,) * 3, np.float32)
    voxel_mm3 = float(np.prod(spacing))
    step = config.step_mm * (np.count_nonzero(mask) * voxel_mm3 / (1000.0 * config.reference_ml)) ** (1.0 / 3.0)
    # Every stride-th voxel, two or more per cube voxel along each axis: a fine scan's cube costs milliseconds.
    stride = np.maximum(1, np.floor(step / (2.0 * spacing))).astype(int)
    crop = tuple(slice(int(lo), int(hi), int(k)) for lo, hi, k in zip(*box, stride))
    points = np.stack(np.nonzero(mask[crop]), 1) * (spacing * stride)
    points -= points.mean(0)
    # Bins symmetric around the centroid: a mirrored mask fills the mirrored bins, so transforms act on the cube.
    bins = np.floor(points / step + n / 2).astype(np.int64)
    bins = bins[np.all((bins >= 0) & (bins < n), 1)]
    counts = np.bincount(np.ravel_multi_index(bins.T, (n,) * 3), minlength=n ** 3).reshape((n,) * 3)
    return np.clip(counts * (voxel_mm3 * float(np.prod(stride))) / step ** 3, 0.0, 1.0).astype(np.float32)


def encode_atlas(atlas: np.ndarray) -> str:
    """A probability cube as text for the contract: base64 of its zlib-compressed uint8 values (probability x 255)."""
    values = np.round(np.clip(atlas, 0.0, 1.0) * _ATLAS_SCALE).astype(np.uint8)
    return base64.b64encode(zlib.compress(values.tobytes(), 9)).decode("ascii")


@lru_cache(maxsize=16)
def decode_atlas(text: str) -> np.ndarray:
    """Inverse of encode_atlas: a float32 cube (read-only, decoded once per text); ValueError when text is not one."""
    try:
        raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except (ValueError, zlib.error, UnicodeEncodeError) as exc:
        raise ValueError(f"not an encoded atlas ({exc})") from None
    n = round(len(raw) ** (1.0 / 3.0))
    if n < 2 or n ** 3 != len(raw):
        raise ValueError(f"{len(raw)} values are not a cube of at least 2 voxels a side")
    cube = np.frombuffer(raw, np.uint8).reshape((n,) * 3).astype(np.float32) / _ATLAS_SCALE
    cube.flags.writeable = False
    return cube


@dataclass(frozen=True)
class OrientationAtlases:
    """Per training family: its atrium atlas (encode_atlas) and the match its own labels reach (typical); the margin
    by which another transform must fit better to flag; and the cube's step, as OrientationConfig's."""

    # Kilobytes of text per family: not repeated in the repr (heartseg-infer --info prints the contract's).
    atlases: dict[str, str] = field(repr=False)
    typical: dict[str, float]
    margin: float
    step_mm: float = ORIENTATION.step_mm
    reference_ml: float = ORIENTATION.reference_ml

    def __post_init__(self) -> None:
        if not self.atlases or set(self.atlases) != set(self.typical):
            raise ValueError("orientation atlases need at least one family, each with its typical match")
        object.__setattr__(self, "atlases", {str(k): str(v) for k, v in self.atlases.items()})
        object.__setattr__(self, "typical", {str(k): float(v) for k, v in self.typical.items()})
        if len({cube.shape for cube in self.cubes().values()}) != 1:
            raise ValueError("the families' atlases differ in size")
        if not all(0.0 < v <= 1.0 for v in self.typical.values()):
            raise ValueError(f"typical matches must lie in (0, 1], got {self.typical}")
        for name in ("margin", "step_mm", "reference_ml"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if not (0.0 <= self.margin < np.inf and 0.0 < self.step_mm < np.inf and 0.0 < self.reference_ml < np.inf):
            raise ValueError("the margin must be finite and at least 0, the step and the reference volume finite and "
                             "above 0")

    @property
    def config(self) -> OrientationConfig:
        """The cube these atlases were made on."""
        grid = decode_atlas(next(iter(self.atlases.values()))).shape[0]
        return OrientationConfig(grid=grid, step_mm=self.step_mm, reference_ml=self.reference_ml)

    def cubes(self) -> dict[str, np.ndarray]:
        """Each family's atlas as a probability cube."""
        return {name: decode_atlas(text) for name, text in self.atlases.items()}

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: "dict | OrientationAtlases") -> "OrientationAtlases":
        """Inverse of to_dict (an instance is returned as it is)."""
        return data if isinstance(data, cls) else cls(**data)  # type: ignore[arg-type]


@dataclass(frozen=True)
class OrientationMatch:
    """A mask's best match as given (over families) and the best of any other transform, which family gives it."""

    as_given: float
    best: float
    transform: Transform
    family: str

    @property
    def gain(self) -> float:
        """How much better the best other transform fits than the mask as given."""
        return self.best - self.as_given

    def to_dict(self) -> dict:
        """JSON-able form (the transform by name)."""
        return {"as_given": self.as_given, "best": self.best, "transform": transform_name(self.transform),
                "family": self.family}


def _unit_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, np.float64)
    rows = rows - rows.mean(axis=-1, keepdims=True)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def atlas_rows(atlas: np.ndarray) -> np.ndarray:
    """48 x voxels: the atlas under each transform's inverse (TRANSFORMS' order), centred and of unit norm, so that a
    cube's correlation with the atlas under every transform is one product (a transform only moves voxels)."""
    return _unit_rows(np.stack([apply_transform(atlas, inverse_transform(t)).ravel() for t in TRANSFORMS]))


@lru_cache(maxsize=16)
def _stored_rows(text: str) -> np.ndarray:
    rows = atlas_rows(decode_atlas(text)).astype(np.float32)
    rows.flags.writeable = False
    return rows


def transform_scores(cube: np.ndarray, rows: dict[str, np.ndarray], typical: dict[str, float]) -> np.ndarray:
    """families (sorted by name) x 48: the correlation of the cube under each transform (TRANSFORMS' order) with each
    family's atlas, given as its atlas_rows, over the family's typical match."""
    unit = _unit_rows(cube.ravel())
    names = sorted(rows)
    return np.stack([(rows[name] @ unit.astype(rows[name].dtype)) / typical[name] for name in names]).astype(np.float64)


def _match(scores: np.ndarray, names: list[str]) -> OrientationMatch:
    family, index = np.unravel_index(int(np.argmax(scores[:, 1:])), scores[:, 1:].shape)
    return OrientationMatch(float(scores[:, 0].max()), float(scores[family, index + 1]), TRANSFORMS[index + 1],
                            names[family])


def orientation_evidence(mask: np.ndarray, spacing: Iterable[float], atlases: OrientationAtlases,
                         bounds: tuple[np.ndarray, np.ndarray] | None = None) -> OrientationMatch | None:
    """How well the mask fits the training atria as given and under the best other transform; None when empty.
    bounds, the mask's bounding box when the caller has it, saves finding it again."""
    bounds = mask_box(mask) if bounds is None else bounds
    if bounds is None:
        return None
    rows = {name: _stored_rows(text) for name, text in atlases.atlases.items()}
    cube = shape_cube(mask, spacing, atlases.config, bounds)
    return _match(transform_scores(cube, rows, atlases.typical), sorted(rows))


def learn_orientation_atlases(labels: Iterable[tuple[np.ndarray, Iterable[float], str]],
                              config: OrientationConfig = ORIENTATION) -> OrientationAtlases | None:
    """Atlases from (label, spacing, family) of training cases, each family's typical match and the margin: the
    largest gain of another transform over the given one on any training label, left out of its family's atlas
    (at least config.min_margin); None without labelled foreground."""
    cubes: dict[str, list[np.ndarray]] = {}
    for label, spacing, family in labels:
        if np.any(label):
            cubes.setdefault(str(family), []).append(shape_cube(label, spacing, config))
    cubes = {name: members for name, members in cubes.items() if len(members) >= config.min_cases}
    if not cubes:
        return None
    sums = {name: np.sum(members, axis=0) for name, members in cubes.items()}
    # Each label's own match with its family's atlas without it; a family of one case matches itself.
    left_out = {name: [sums[name] - cube for cube in members] for name, members in cubes.items()}
    own = {name: [float(np.dot(_unit_rows(cube.ravel()), _unit_rows(rest.ravel()))) if len(members) > 1 else 1.0
                  for cube, rest in zip(members, left_out[name])] for name, members in cubes.items()}
    typical = {name: float(np.clip(np.median(values), 1e-3, 1.0)) for name, values in own.items()}
    names = sorted(cubes)
    rows = {name: atlas_rows(total) for name, total in sums.items()}
    gains = [_match(transform_scores(cube, {**rows, name: atlas_rows(rest)}, typical), names).gain
             for name, members in cubes.items() if len(members) > 1
             for cube, rest in zip(members, left_out[name])]
    atlases = {name: encode_atlas(sums[name] / len(cubes[name])) for name in names}
    return OrientationAtlases(atlases, {name: typical[name] for name in names},
                              max([config.min_margin, *gains]), config.step_mm, config.reference_ml)
