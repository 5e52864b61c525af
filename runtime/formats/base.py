"""What every scan reader and mask writer shares: the loaded scan, the registries, optional imports."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from ..errors import InputError
from ..image import Volume

# Optional extra of pyproject.toml that provides each third-party module, and the package that holds it.
EXTRAS = {"pydicom": "dicom", "highdicom": "dicom", "nrrd": "nrrd", "SimpleITK": "itk", "skimage": "mesh"}
PACKAGES = {"pydicom": "pydicom", "highdicom": "highdicom", "nrrd": "pynrrd", "SimpleITK": "SimpleITK",
            "skimage": "scikit-image"}


def optional_import(module: str, purpose: str) -> ModuleType:
    """Import an optional dependency, or fail with the pip commands that install it (exit 2)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        package = PACKAGES.get(top, top)
        hint = f"pip install {package}"
        if top in EXTRAS:
            hint += f", or heartseg's '{EXTRAS[top]}' extra: pip install -e '.[{EXTRAS[top]}]' in its source folder"
        raise InputError(f"{purpose}: {package} is not installed ({hint})") from None


@dataclass(frozen=True)
class ScanSource:
    """One scan to read: a file, or one series of a DICOM folder / zip (series: its SeriesInstanceUID)."""

    path: Path
    format: str
    name: str
    series: str | None = None

    def __str__(self) -> str:
        return f"{self.path} (series {self.series})" if self.series else str(self.path)


@dataclass
class ScanImage:
    """A loaded scan: the voxels on their grid (affine in RAS+ mm) and what its format needs to write back."""

    volume: Volume
    source: ScanSource
    extra: dict[str, Any] = field(default_factory=dict)


class Reader(Protocol):
    """Reads one format into a ScanImage."""

    name: str

    def claims(self, path: Path) -> bool:
        """True when path is a scan of this format (by name, or for DICOM by content)."""

    def sources(self, path: Path, series: str | None) -> list[ScanSource]:
        """The scans that path holds (one, or one per selected DICOM series)."""

    def read(self, source: ScanSource) -> ScanImage:
        """Load and validate one scan."""


class Writer(Protocol):
    """Writes a binary mask in one format, atomically."""

    name: str
    suffix: str

    def write(self, scan: ScanImage, mask: np.ndarray, path: Path, overwrite: bool) -> Path:
        """Write mask (on scan's grid) to path and return path."""
