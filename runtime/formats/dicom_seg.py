"""DICOM SEG with highdicom: a binary left-atrium segment that references every slice of the source series.

highdicom builds the SEG's shared and per-frame functional groups (plane positions, orientation,
pixel measures, references to the source instances) from the source datasets themselves, which is
what 3D Slicer, OHIF and dcmqi need to lay the segment over the series.

The SEG copies the Patient and General Study modules from the series. Their type 2 attributes
(present, possibly empty) that the series lacks are written empty, and a missing slice thickness
becomes the distance between the slices. What a SEG cannot do without (its study, the frame of
reference it shares with the series, the instances it references) is checked before any segmenting.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_output
from ..errors import InputError
from .base import ScanImage, optional_import

SEGMENT_LABEL = "Left atrium"
SEGMENT_RGB = (255, 0, 0)  # red, as in the overlay
CONTENT_LABEL = "LEFT_ATRIUM"
SERIES_DESCRIPTION = "heartseg left atrium"
SERIES_NUMBER = 9901
# Type 2 attributes of the Patient and General Study modules that the SEG copies from its first source slice.
TYPE_2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")
# Type 1 attributes of every source slice without which the SEG cannot be placed on the series.
REQUIRED = ("StudyInstanceUID", "FrameOfReferenceUID", "SOPClassUID", "SOPInstanceUID")
PIXEL_DATA = 0x7FE00010


def _version() -> str:
    from .. import __version__

    return __version__


class DicomSegWriter:
    """Writes the mask as a DICOM SEG object (binary, one segment) for a scan read from a DICOM series."""

    name = "dicom-seg"
    suffix = "_seg.dcm"

    def check(self, scan: ScanImage) -> None:
        """InputError, before any segmenting, when the scan is not a DICOM series a SEG can reference."""
        series = scan.extra.get("dicom")
        if series is None:
            raise InputError(f"{scan.source}: DICOM SEG output needs a DICOM series as input "
                             f"(this scan is {scan.source.format}); use --output-format nifti")
        for keyword in REQUIRED:
            lacking = sum(1 for ds in series.datasets if not ds.get(keyword))
            if lacking:
                raise InputError(f"{scan.source}: a DICOM SEG needs {keyword} in every slice, and {lacking} of the "
                                 f"{len(series.datasets)} slices have none; use --output-format nifti")

    def write(self, scan: ScanImage, mask: np.ndarray, path: Path, overwrite: bool) -> Path:
        """Write the SEG; the scan must come from a DICOM series."""
        self.check(scan)
        if path.exists() and not overwrite:
            raise InputError(f"{path}: exists (use --overwrite to replace it)")
        series = scan.extra["dicom"]
        seg = build_segmentation(series.datasets, mask, slice_spacing(series.affine))
        with atomic_output(path) as tmp:
            seg.save_as(str(tmp))
        return path


def slice_spacing(affine: np.ndarray) -> float:
    """The distance between neighbouring slices along their normal (mm), from a voxel-to-world affine."""
    axes = np.asarray(affine, float)[:3, :3]
    normal = np.cross(axes[:, 0], axes[:, 1])
    return float(abs(axes[:, 2] @ normal) / np.linalg.norm(normal))


def source_header(ds: Any, slice_thickness: float) -> Any:
    """A copy of a source slice's header (no pixels) with the type 2 attributes the SEG copies present."""
    pydicom = optional_import("pydicom", "writing DICOM SEG")
    header = pydicom.Dataset()
    for element in ds:
        if element.tag != PIXEL_DATA:
            header.add(copy.deepcopy(element))  # its own: filling in a value must not edit the series read
    for keyword in TYPE_2_COPIED:
        if keyword not in header:
            setattr(header, keyword, "")
    if not header.get("SliceThickness"):
        header.SliceThickness = pydicom.valuerep.DSfloat(slice_thickness, auto_format=True)
    return header


def build_segmentation(datasets: list, mask: np.ndarray, slice_thickness: float):
    """A highdicom Segmentation of mask (column, row, slice; slices in the order of datasets).

    slice_thickness is the SEG's slice thickness where the source slices have none (their spacing).
    """
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
        display_color=hd.color.CIELabColor.from_rgb(*SEGMENT_RGB),
    )
    return hd.seg.Segmentation(
        source_images=[source_header(ds, slice_thickness) for ds in datasets],
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
        content_label=CONTENT_LABEL,
        content_creator_name="",  # type 2: no person drew it
        omit_empty_frames=False,
    )
