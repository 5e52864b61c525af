"""NIfTI (.nii, .nii.gz): the reference format, read and validated by heartseg.runtime.image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..image import is_nifti_path, load_volume, save_volume, strip_nifti_suffix
from .base import ScanImage, ScanSource


class NiftiReader:
    """Reads NIfTI-1/2 scans with nibabel."""

    name = "nifti"
    suffixes = (".nii", ".nii.gz")

    def claims(self, path: Path) -> bool:
        """A file named *.nii or *.nii.gz."""
        return is_nifti_path(path)

    def sources(self, path: Path, series: str | None) -> list[ScanSource]:
        """The file itself."""
        return [ScanSource(path, self.name, strip_nifti_suffix(path.name))]

    def read(self, source: ScanSource) -> ScanImage:
        """Load and validate the scan."""
        return ScanImage(load_volume(source.path), source)


class NiftiWriter:
    """Writes uint8 masks as NIfTI-1 with the scan's affine in both qform and sform."""

    name = "nifti"
    suffix = "_mask.nii.gz"

    def write(self, scan: ScanImage, mask: np.ndarray, path: Path, overwrite: bool) -> Path:
        """Write the mask on the scan's grid."""
        return save_volume(mask.astype(np.uint8), scan.volume.affine, path, overwrite=overwrite)
