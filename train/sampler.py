"""Training patches: foreground oversampling, and crops that mimic the cascade's inference crop."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch
from heartseg.runtime.contract import StageContract
from heartseg.runtime.preprocess import crop_padded, mask_box

from .augment import AugmentConfig, augment
from .cache import PreparedCase


@dataclass
class SamplerConfig:
    """How patches are drawn."""

    batch_size: int = 2
    foreground_fraction: float = 0.5
    # A fine stage only ever sees the region the localiser boxed: other patches come from there.
    box_jitter_mm: float = 10.0


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

    def _origin(self, index: int) -> np.ndarray:
        image, _ = self.cases[index].stages[self.stage.name]
        shape = np.asarray(image.shape)
        fg = self.foreground[index]
        if len(fg) and self.rng.random() < self.config.foreground_fraction:
            centre = fg[self.rng.integers(len(fg))]
            return centre - self.patch // 2 + self.rng.integers(-self.patch // 4, self.patch // 4 + 1)
        box = self.boxes[index]
        if self.stage.crop_margin_mm > 0 and box is not None:
            reach = (self.stage.crop_margin_mm + self.config.box_jitter_mm) / np.asarray(self.stage.spacing)
            lo = np.floor(box[0] - reach).astype(int)
            hi = np.ceil(box[1] + reach).astype(int) - self.patch
            return self.rng.integers(np.minimum(lo, hi), np.maximum(lo, hi) + 1)
        high = np.maximum(shape - self.patch, 0)
        return self.rng.integers(0, high + 1)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch: images (N, 1, D, H, W) float32 and labels (N, 1, D, H, W) float32."""
        images, labels = [], []
        for _ in range(self.config.batch_size):
            index = int(self.rng.integers(len(self.cases)))
            image, label = self.cases[index].stages[self.stage.name]
            lo = self._origin(index)
            hi = lo + self.patch
            img = torch.from_numpy(crop_padded(np.asarray(image), lo, hi, fill=float(np.min(image))))[None]
            lbl = torch.from_numpy(crop_padded(np.asarray(label), lo, hi, fill=0).astype(np.float32))[None]
            img, lbl = augment(img, lbl, self.augment_config, self.torch_rng)
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
