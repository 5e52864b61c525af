"""Deterministic data augmentation for one (C, D, H, W) image and its (1, D, H, W) label (binary, or soft).

Inputs are single, unbatched samples (the patch sampler augments each patch, then stacks them into
a batch). All randomness comes from the ``torch.Generator``
passed in, so the same seed and config give the same output.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import interpolate, ndimage
from torch import Tensor
from torch.nn import functional as F

from .options import AugmentConfig

__all__ = ["AugmentConfig", "augment", "thick_slices"]


def _uniform(rng: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=rng, device=rng.device))


def _chance(rng: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=rng, device=rng.device)) < p


def _rotation(ax: float, ay: float, az: float) -> Tensor:
    """Rotation matrix in (x=W, y=H, z=D) order for angles in radians around x, y and z."""
    cx, sx, cy, sy, cz, sz = math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ ry @ rx


def _spatial(image: Tensor, label: Tensor, config: AugmentConfig, rng: torch.Generator,
             soft_label: bool = False) -> tuple[Tensor, Tensor]:
    off = math.radians(config.off_axis_rotation_deg)
    ax = _uniform(rng, -off, off)
    ay = _uniform(rng, -off, off)
    az = _uniform(rng, -math.radians(config.rotation_deg), math.radians(config.rotation_deg))
    scale = _uniform(rng, *config.scale_range)
    # Output voxel p samples input voxel R p / scale (about the centre), so scale > 1 zooms in.
    voxel_map = _rotation(ax, ay, az) / scale
    # affine_grid works in [-1, 1] coordinates per axis; conjugating by the half-extents keeps the
    # rotation rigid in voxel space for non-cubic volumes (voxel spacing is taken as isotropic).
    d, h, w = image.shape[1:]
    half = torch.tensor([w / 2.0, h / 2.0, d / 2.0], dtype=torch.float64)
    theta3 = voxel_map * half[None, :] / half[:, None]
    theta = torch.cat([theta3, torch.zeros(3, 1, dtype=torch.float64)], dim=1)[None]
    theta = theta.to(device=image.device, dtype=image.dtype)
    grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
    new_image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    # Nearest-neighbour sampling keeps a binary label exactly binary; a soft one is resampled as a share.
    new_label = F.grid_sample(
        label[None].to(image.dtype), grid, mode="bilinear" if soft_label else "nearest", padding_mode="zeros",
        align_corners=False,
    )[0]
    return new_image, new_label.to(label.dtype)


def _gamma(image: Tensor, gamma: float) -> Tensor:
    out = image.clone()
    for c in range(image.shape[0]):
        lo, hi = image[c].min(), image[c].max()
        span = hi - lo
        if float(span) <= 1e-8:
            continue
        unit = ((image[c] - lo) / span).clamp_(0.0, 1.0)
        out[c] = unit.pow(gamma) * span + lo
    return out


def _bias_field(image: Tensor, strength: float, rng: torch.Generator) -> Tensor:
    """Multiply by exp(a smooth random quadratic field), about the image's minimum (the background)."""
    coords = [torch.linspace(-1.0, 1.0, n, dtype=image.dtype, device=image.device) for n in image.shape[1:]]
    zz, yy, xx = torch.meshgrid(*coords, indexing="ij")
    terms = [zz, yy, xx, zz * yy, zz * xx, yy * xx, zz**2, yy**2, xx**2]
    weights = [_uniform(rng, -1.0, 1.0) for _ in terms]
    field = sum(w * t for w, t in zip(weights, terms))
    field = field / field.abs().max().clamp_min(1e-6) * _uniform(rng, 0.0, strength)
    low = image.amin(dim=(1, 2, 3), keepdim=True)
    return (image - low) * torch.exp(field)[None] + low


def _dark_pool(image: Tensor, label: Tensor, depth: int, darkening: float) -> Tensor:
    """Darken the label's interior by darkening patch standard deviations, ramping up over depth voxels
    inside its edge and smoothed over one voxel (a washed-out blood pool inside a brighter wall)."""
    inside = label[None].to(image.dtype)
    ramp = torch.zeros_like(inside)
    for _ in range(depth):
        inside = -F.max_pool3d(-inside, 3, stride=1, padding=1)  # one voxel of erosion
        ramp = ramp + inside
    ramp = F.avg_pool3d(ramp / depth, 3, stride=1, padding=1, count_include_pad=False)[0]
    spread = image.std(dim=(1, 2, 3), keepdim=True)
    return image - darkening * spread * ramp


def thick_slices(image: np.ndarray, axis: int, factor: float, phase: float) -> np.ndarray:
    """image as a scan of slices factor voxels thick along axis shows it once resampled back to this grid: each
    slice the mean over its slab, slice centres phase + k * factor voxels, values between them interpolated
    linearly (what the runtime's resampling does); unchanged for factor <= 1 or a single slice."""
    if factor <= 1.0 or image.shape[axis] < 2:
        return image
    n = image.shape[axis]
    # The slab mean: each voxel weighted by how much of it lies within half a slab of the centre (symmetric, so
    # nothing shifts); past the edge the last slice repeats, as a scan ends there.
    half = factor / 2.0
    offsets = np.arange(-math.ceil(half - 0.5), math.ceil(half - 0.5) + 1)
    weights = np.clip(np.minimum(offsets + 0.5, half) - np.maximum(offsets - 0.5, -half), 0.0, None)
    slabs = ndimage.correlate1d(np.asarray(image, np.float32), weights / weights.sum(), axis=axis, mode="nearest")
    centres = np.unique(np.concatenate([[0.0], np.arange(phase % factor, n - 1, factor), [n - 1.0]]))
    # The slices sampled at their centres, and the grid back between its two nearest slice centres.
    samples = interpolate.interp1d(np.arange(n), slabs, axis=axis, assume_sorted=True)(centres)
    back = interpolate.interp1d(centres, samples, axis=axis, assume_sorted=True)(np.arange(n))
    return np.ascontiguousarray(back, dtype=np.float32)


def augment(
    image: Tensor, label: Tensor, config: AugmentConfig, rng: torch.Generator, soft_label: bool = False
) -> tuple[Tensor, Tensor]:
    """Randomly augment a float (C, D, H, W) image and its (1, D, H, W) label, binary or (soft_label) a share
    per voxel; inputs are not modified."""
    if image.dim() != 4 or label.dim() != 4:
        raise ValueError(
            f"expected unbatched (C, D, H, W) image and label, got {tuple(image.shape)} and {tuple(label.shape)}"
        )
    if image.shape[1:] != label.shape[1:]:
        raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} spatial shapes differ")
    if not image.is_floating_point():
        raise TypeError(f"image must be floating point, got {image.dtype}")

    flip_dims = [axis + 1 for axis in config.flip_axes if _chance(rng, config.p_flip)]
    if flip_dims:
        image, label = image.flip(flip_dims), label.flip(flip_dims)

    if _chance(rng, config.p_spatial):
        image, label = _spatial(image, label, config, rng, soft_label)

    # Drawn only when enabled, so that configurations without it keep their random streams.
    if config.p_dark_pool > 0 and _chance(rng, config.p_dark_pool):
        image = _dark_pool(image, label, config.dark_pool_depth, _uniform(rng, *config.dark_pool_sd))

    factor = _uniform(rng, *config.intensity_scale)
    shift = _uniform(rng, -config.intensity_shift, config.intensity_shift)
    if factor != 1.0 or shift != 0.0:
        image = image * factor + shift

    # Drawn only when enabled, so that configurations without it keep their random streams.
    if config.p_invert > 0 and _chance(rng, config.p_invert):
        image = -image

    if _chance(rng, config.p_gamma):
        # Log-uniform so that (0.8, 1.25) is symmetric between darkening and brightening.
        lo, hi = config.gamma_range
        image = _gamma(image, math.exp(_uniform(rng, math.log(lo), math.log(hi))))

    if config.bias_field > 0 and _chance(rng, config.p_bias):
        image = _bias_field(image, config.bias_field, rng)

    if config.noise_std > 0 and _chance(rng, config.p_noise):
        noise = torch.randn(image.shape, generator=rng, device=rng.device, dtype=image.dtype)
        image = image + config.noise_std * noise.to(image.device)

    return image, label
