"""DICOM SEG with highdicom: a binary left-atrium segment that references every slice of the source series.

highdicom builds the SEG's shared and per-frame functional groups (plane positions, orientation,
pixel measures, references to the source instances) from the source datasets themselves, which is
what 3D Slicer and OHIF need to lay the segment over the series.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from ..errors import InputError
from .base import ScanImage, optional_import

SEGMENT_LABEL = "Left atrium"
SERIES_DESCRIPTION = "heartseg left atrium"
SERIES_NUMBER = 9901


def _version() -> str:
    from .. import __version__

    return __version__


class DicomSegWriter:
    """Writes the mask as a DICOM SEG object (binary, one segment) for a scan read from a DICOM series."""

    name = "dicom-seg"
    suffix = "_seg.dcm"

    def write(self, scan: ScanImage, mask: np.ndarray, path: Path, overwrite: bool) -> Path:
        """Write the SEG; the scan must come from a DICOM series."""
        series = scan.extra.get("dicom")
        if series is None:
            raise InputError(f"{scan.source}: DICOM SEG output needs a DICOM series as input "
                             f"(this scan is {scan.source.format}); use --output-format nifti")
        if path.exists() and not overwrite:
            raise InputError(f"{path}: exists (use --overwrite to replace it)")
        seg = build_segmentation(series.datasets, mask)
        with atomic_output(path) as tmp:
            seg.save_as(str(tmp))
        return path


def build_segmentation(datasets: list, mask: np.ndarray):
    """A highdicom Segmentation of mask (column, row, slice; slices in the order of datasets)."""
    hd = optional_import("highdicom", "writing DICOM SEG")
    codes = optional_import("pydicom.sr.codedict", "writing DICOM SEG").codes
    mask = np.asarray(mask, np.uint8)
    if mask.shape[2] != len(datasets):
        raise AssertionError(f"mask has {mask.shape[2]} slices, the series {len(datasets)}")
    frames = np.ascontiguousarray(mask.transpose(2, 1, 0))  # (slice, row, column), as the source frames
    version = _version()
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.AnatomicalStructure,
        segmented_property_type=codes.SCT.LeftAtrium,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="heartseg", version=version, family=codes.cid7162.ArtificialIntelligence),
    )
    return hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="heartseg",
        manufacturer_model_name="heartseg",
        software_versions=version,
        device_serial_number="0",
        series_description=SERIES_DESCRIPTION,
        omit_empty_frames=False,
    )
