"""Training patches: foreground oversampling, and crops that mimic the cascade's inference crop."""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from heartseg.runtime.contract import StageContract
from heartseg.runtime.errors import HeartsegError
from heartseg.runtime.preprocess import crop_padded, mask_box

from .augment import AugmentConfig, augment, thick_slices
from .cache import SOFT_SCALE, PreparedCase


@dataclass
class SamplerConfig:
    """How patches are drawn."""

    batch_size: int = 2
    foreground_fraction: float = 0.5
    # Relative weights of the datasets (None: each equally often).
    dataset_weights: dict[str, float] | None = None
    # A fine stage only ever sees the region the localiser boxed: other patches come from there.
    box_jitter_mm: float = 10.0
    # Targets: the label's share of each voxel (PreparedCase.soft_labels) instead of that share rounded.
    soft_labels: bool = False


def sampler_reach(stage: StageContract, config: SamplerConfig | None = None) -> np.ndarray:
    """Per axis, how far beyond a case's label box PatchSampler may read (the longest patch side may fall on
    any axis): what a copy of a case must keep around its atrium to train the same."""
    config = config or SamplerConfig()
    side = max(stage.patch_size)
    # Around a foreground voxel: half a patch plus a quarter of jitter. Around the box: the margin and its
    # jitter, or, when box and margin are smaller than a patch, what a patch covering them reaches.
    box = np.ceil((stage.crop_margin_mm + config.box_jitter_mm) / np.asarray(stage.spacing)).astype(int)
    return np.maximum.reduce([np.full(3, side // 2 + side // 4), box, side - box - 1])


class PatchSampler:
    """Draws augmented (image, label) batches of one stage from prepared cases."""

    def __init__(self, cases: list[PreparedCase], stage: StageContract, config: SamplerConfig,
                 augment_config: AugmentConfig, seed: int) -> None:
        self.cases = cases
        self.stage = stage
        self.config = config
        self.augment_config = augment_config
        self.rng = np.random.default_rng(seed)
        self.torch_rng = torch.Generator().manual_seed(seed)
        self.patch = np.asarray(stage.patch_size)
        self.foreground = [np.argwhere(c.stages[stage.name][1]) for c in cases]
        self.boxes = [mask_box(c.stages[stage.name][1]) for c in cases]
        # What a patch reaching past the scan is padded with: once per case, not per patch.
        self.fills = [float(np.min(c.stages[stage.name][0])) for c in cases]
        # The targets drawn: the binary labels, or their shares (stored as uint8 of SOFT_SCALE).
        self.targets = [c.soft_labels[stage.name] if config.soft_labels else c.stages[stage.name][1] for c in cases]
        # Balanced per dataset: pick a dataset uniformly (or by its weight), then one of its cases.
        names = sorted({c.dataset for c in cases})
        self.by_dataset = [[i for i, c in enumerate(cases) if c.dataset == name] for name in names]
        self.dataset_p = None
        if config.dataset_weights:
            weights = np.array([config.dataset_weights.get(name, 1.0) for name in names], float)
            self.dataset_p = weights / weights.sum()

    def reseeded(self, seed: int) -> "PatchSampler":
        """The same sampler with its own random streams (one per worker process)."""
        other = copy.copy(self)
        seed %= 2**63
        other.rng = np.random.default_rng(seed)
        other.torch_rng = torch.Generator().manual_seed(seed)
        return other

    def _case_index(self) -> int:
        # Without weights, the same draw as before weights existed, so earlier runs repeat.
        pick = self.rng.choice(len(self.by_dataset), p=self.dataset_p) if self.dataset_p is not None \
            else self.rng.integers(len(self.by_dataset))
        members = self.by_dataset[int(pick)]
        return members[int(self.rng.integers(len(members)))]

    def _permutation(self) -> np.ndarray:
        if self.augment_config.p_permute > 0 and self.rng.random() < self.augment_config.p_permute:
            return self.rng.permutation(3)
        return np.arange(3)

    def _origin(self, index: int, patch: np.ndarray) -> np.ndarray:
        image, _ = self.cases[index].stages[self.stage.name]
        shape = np.asarray(image.shape)
        fg = self.foreground[index]
        if len(fg) and self.rng.random() < self.config.foreground_fraction:
            centre = fg[self.rng.integers(len(fg))]
            return centre - patch // 2 + self.rng.integers(-patch // 4, patch // 4 + 1)
        box = self.boxes[index]
        if self.stage.crop_margin_mm > 0 and box is not None:
            reach = (self.stage.crop_margin_mm + self.config.box_jitter_mm) / np.asarray(self.stage.spacing)
            lo = np.floor(box[0] - reach).astype(int)
            hi = np.ceil(box[1] + reach).astype(int) - patch
            return self.rng.integers(np.minimum(lo, hi), np.maximum(lo, hi) + 1)
        high = np.maximum(shape - patch, 0)
        return self.rng.integers(0, high + 1)

    def _fov_cut(self, image: np.ndarray, label: np.ndarray, fill: float) -> None:
        """In place, with probability p_fov_cut: the scan ends at a random plane through the patch's label."""
        # Drawn only when enabled, so that configurations without it keep their random streams.
        if self.augment_config.p_fov_cut <= 0 or self.rng.random() >= self.augment_config.p_fov_cut:
            return
        box = mask_box(label)
        if box is None:
            return
        axis = int(self.rng.integers(3))
        plane = int(self.rng.integers(box[0][axis] + 1, max(box[1][axis], box[0][axis] + 2)))
        beyond = [slice(None)] * 3
        beyond[axis] = slice(plane, None) if self.rng.random() < 0.5 else slice(0, plane)
        image[tuple(beyond)] = fill
        label[tuple(beyond)] = 0

    def _thick_slices(self, image: np.ndarray, perm: np.ndarray) -> np.ndarray:
        """With probability p_thick_slice: the patch as a scan of thicker slices along one random axis shows it."""
        # Drawn only when enabled, so that configurations without it keep their random streams.
        config = self.augment_config
        if config.p_thick_slice <= 0 or self.rng.random() >= config.p_thick_slice:
            return image
        axis = int(self.rng.integers(3))
        thickness = self.rng.uniform(*config.thick_slice_mm)
        factor = thickness / float(np.asarray(self.stage.spacing)[perm][axis])
        return thick_slices(image, axis, factor, self.rng.uniform(0.0, factor))

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: images (N, 1, D, H, W) float32 and labels (N, 1, D, H, W) float32."""
        images, labels = [], []
        for _ in range(self.config.batch_size):
            index = self._case_index()
            image, label = self.cases[index].stages[self.stage.name][0], self.targets[index]
            # Crop the region whose axes, permuted by perm, have the patch's shape.
            perm = self._permutation()
            crop = self.patch[np.argsort(perm)]
            lo = self._origin(index, crop)
            hi = lo + crop
            img_np = crop_padded(np.asarray(image), lo, hi, fill=self.fills[index]).transpose(perm)
            lbl_np = crop_padded(np.asarray(label), lo, hi, fill=0).astype(np.float32).transpose(perm)
            if self.config.soft_labels:
                lbl_np /= SOFT_SCALE
            img_np = self._thick_slices(img_np, perm)
            self._fov_cut(img_np, lbl_np, self.fills[index])
            img = torch.from_numpy(np.ascontiguousarray(img_np))[None]
            lbl = torch.from_numpy(np.ascontiguousarray(lbl_np))[None]
            img, lbl = augment(img, lbl, self.augment_config, self.torch_rng, soft_label=self.config.soft_labels)
            images.append(img)
            labels.append(lbl)
        return torch.stack(images), torch.stack(labels)


class BackgroundBatches:
    """Prepares batches in a thread so that sampling and augmentation overlap the training step."""

    def __init__(self, sampler: PatchSampler, depth: int = 3) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(sampler,), daemon=True)
        self._thread.start()

    def _fill(self, sampler: PatchSampler) -> None:
        while not self._stop.is_set():
            try:
                batch = sampler.sample()
            except BaseException as exc:  # surfaced in next()
                batch = exc
            while not self._stop.is_set():
                try:
                    self._queue.put(batch, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if isinstance(batch, BaseException):
                return

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the producer thread."""
        self._stop.set()
        self._thread.join(timeout=5)


class _Patches(torch.utils.data.IterableDataset):
    """An endless stream of one sampler's batches, reseeded in each worker process."""

    def __init__(self, sampler: PatchSampler, seed: int) -> None:
        self.sampler, self.seed = sampler, seed

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        sampler = self.sampler.reseeded(self.seed * 7919 + worker.id) if worker else self.sampler
        while True:
            yield sampler.sample()


class WorkerBatches:
    """Prepares batches in worker processes: a GPU takes patches faster than one CPU thread augments them.

    Repeatable for a given number of workers (each reseeded, their batches taken in turn), but the
    patches differ from those of one background thread or of another number of workers.
    """

    def __init__(self, sampler: PatchSampler, workers: int, seed: int, pin_memory: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        loader = torch.utils.data.DataLoader(_Patches(sampler, seed), batch_size=None, num_workers=workers,
                                             prefetch_factor=2, pin_memory=pin_memory)
        self._iterator = iter(loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch."""
        try:
            return next(self._iterator)
        except RuntimeError as exc:  # a worker died: out of memory, or a small /dev/shm in a container
            raise HeartsegError(f"the patch workers failed ({str(exc).splitlines()[0][:200]}); train with fewer "
                                "--workers, --workers 0, or a larger /dev/shm") from None

    def close(self) -> None:
        """Stop the worker processes (the iterator's own shutdown; dropping it would wait for the collector)."""
        shutdown = getattr(self._iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
