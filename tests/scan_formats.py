"""Writers of test scans in the formats heartseg reads: DICOM series (pydicom), NRRD (pynrrd), MetaImage (SimpleITK).

Each takes an (x, y, z) array and its voxel-to-RAS affine, and writes the same voxels at the same
places in the format's own conventions (DICOM, NRRD 'left-posterior-superior' and ITK are LPS).
The conversions are written out here, apart from heartseg's readers, so that a test compares two
independent derivations of the geometry.
"""

from __future__ import annotations

import datetime
import io
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def rotation(degrees: tuple[float, float, float]) -> np.ndarray:
    """A rotation matrix about x, then y, then z."""
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def reorient(data: np.ndarray, affine: np.ndarray, order: tuple[int, int, int],
             flips: tuple[bool, bool, bool]) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored with permuted and flipped array axes, and the affine that keeps them in place."""
    out = np.transpose(data, order)
    new = np.eye(4)
    new[:3, :3] = affine[:3, :3][:, list(order)]
    new[:3, 3] = affine[:3, 3]
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis)
            new[:3, 3] += new[:3, axis] * (out.shape[axis] - 1)
            new[:3, axis] *= -1
    return np.ascontiguousarray(out), new


def write_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """A NIfTI file with the affine in qform and sform."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))
    return path


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) of value."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.8g}"


def write_dicom_series(data: np.ndarray, affine: np.ndarray, folder: Path, *, series_number: int = 3,
                       description: str = "LA 3D", study_uid: str | None = None, seed: int = 0,
                       slope: float = 1.0, intercept: float = 0.0) -> list[Path]:
    """One MR image file per slice of data[:, :, k] (columns x, rows y), in shuffled file order."""
    pydicom = pytest.importorskip("pydicom", reason="pydicom is not installed (pip install 'heartseg[dicom]')")
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    lps = RAS_TO_LPS @ np.asarray(affine, float)
    col_step, row_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    column_spacing, row_spacing = np.linalg.norm(col_step), np.linalg.norm(row_step)
    orientation = [*(col_step / column_spacing), *(row_step / row_spacing)]
    stored = np.round((np.asarray(data, float) - intercept) / slope).astype(np.int16)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    order = np.random.default_rng(seed).permutation(data.shape[2])
    now = datetime.datetime(2024, 5, 6, 7, 8, 9)
    paths = []
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{int(order[k]):04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Heart", "HS001", "19700101", "O"
        ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = study_uid, "1", "A1"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.Manufacturer = "MR", "heartseg-tests"
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, series_number, description
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImageOrientationPatient = [_ds(v) for v in orientation]
        ds.ImagePositionPatient = [_ds(v) for v in lps[:3, 3] + k * slice_step]
        ds.PixelSpacing = [_ds(row_spacing), _ds(column_spacing)]
        ds.SliceThickness = _ds(float(np.linalg.norm(slice_step)))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[0])
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = _ds(slope), _ds(intercept)
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def zip_folder(folder: Path, path: Path) -> Path:
    """A zip of every file under folder."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                archive.write(file, file.relative_to(folder))
    return path


def write_nrrd(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """An NRRD file in 'left-posterior-superior' space, as 3D Slicer writes them."""
    nrrd = pytest.importorskip("nrrd", reason="pynrrd is not installed (pip install 'heartseg[nrrd]')")
    lps = RAS_TO_LPS @ np.asarray(affine, float)
    header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T, "space origin": lps[:3, 3],
              "kinds": ["domain", "domain", "domain"], "encoding": "gzip"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(path), np.asarray(data), header, index_order="F")
    return path


def write_mha(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """A MetaImage file: SimpleITK's array is (z, y, x); origin, spacing and direction are LPS."""
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is not installed (pip install 'heartseg[itk]')")
    lps = RAS_TO_LPS @ np.asarray(affine, float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)))
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


# Writers of hand-made headers: they write whatever they are given, so that a test can declare sizes, data files
# and encodings that no library writer would produce.

ZERO_CHUNK = 1 << 24


def compressed_zeros(count: int, container: str = "gzip") -> bytes:
    """count zero bytes deflated at level 1 in a gzip or zlib container (about 5 KB per MB)."""
    wbits = {"gzip": 16 + 15, "zlib": 15}[container]
    compressor = zlib.compressobj(1, zlib.DEFLATED, wbits)
    parts, left = [], count
    while left:
        n = min(left, ZERO_CHUNK)
        parts.append(compressor.compress(bytes(n)))
        left -= n
    parts.append(compressor.flush())
    return b"".join(parts)


def write_zeros(handle, count: int) -> None:
    """Write count zero bytes to handle in chunks."""
    left = count
    while left:
        n = min(left, ZERO_CHUNK)
        handle.write(bytes(n))
        left -= n


def write_nrrd_text(path: Path, fields: dict[str, str], body: bytes = b"") -> Path:
    """A NRRD file of exactly these header fields ('name: value' lines), then (without a data file) a blank line
    and body."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "NRRD0004\n" + "".join(f"{name}: {value}\n" for name, value in fields.items())
    path.write_bytes(text.encode() + (b"" if "data file" in fields else b"\n" + body))
    return path


def nrrd_fields(sizes: tuple[int, ...], spacing: float = 1.0, **extra: str) -> dict[str, str]:
    """NRRD header fields of an LPS volume of uint8 voxels, sizes along its axes (extra overrides, '_' for ' ')."""
    directions = " ".join("(" + ",".join(str(spacing if i == j else 0) for j in range(3)) + ")" for i in range(3))
    fields = {"type": "uint8", "dimension": str(len(sizes)), "space": "left-posterior-superior",
              "sizes": " ".join(map(str, sizes)), "space directions": directions, "endian": "little",
              "encoding": "raw"}
    fields.update({name.replace("_", " "): value for name, value in extra.items()})
    return fields


def write_mha_text(path: Path, fields: dict[str, str], body: bytes = b"") -> Path:
    """A MetaImage header of exactly these fields ('Name = value' lines, ElementDataFile last), then body."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{name} = {value}\n" for name, value in fields.items() if name != "ElementDataFile")
    text += f"ElementDataFile = {fields.get('ElementDataFile', 'LOCAL')}\n"
    path.write_bytes(text.encode() + body)
    return path


def mha_fields(sizes: tuple[int, ...], spacing: float = 1.0, **extra: str) -> dict[str, str]:
    """MetaImage header fields of a volume of MET_UCHAR voxels (extra overrides or adds fields)."""
    fields = {"ObjectType": "Image", "NDims": str(len(sizes)), "BinaryData": "True",
              "BinaryDataByteOrderMSB": "False", "CompressedData": "False",
              "TransformMatrix": "1 0 0 0 1 0 0 0 1", "Offset": "0 0 0",
              "ElementSpacing": " ".join([str(spacing)] * len(sizes)), "DimSize": " ".join(map(str, sizes)),
              "ElementType": "MET_UCHAR", "ElementDataFile": "LOCAL"}
    fields.update(extra)
    return fields


def dicom_trailing_padding(count: int) -> bytes:
    """The element header of DataSetTrailingPadding (FFFC,FFFC), explicit VR little endian, of count bytes."""
    return b"\xfc\xff\xfc\xffOB\x00\x00" + count.to_bytes(4, "little")


def zip_with_members(folder: Path, path: Path, members: dict[str, tuple[bytes, int]]) -> Path:
    """A zip of the files under folder plus members, each name: (head, n), its head followed by n zero bytes
    (deflated as they are written, so that no member is ever held whole)."""
    zip_folder(folder, path)
    with zipfile.ZipFile(path, "a", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, (head, zeros) in members.items():
            with archive.open(name, "w", force_zip64=True) as handle:
                handle.write(head)
                write_zeros(handle, zeros)
    return path


def dicom_bytes(ds) -> bytes:
    """A pydicom dataset as the bytes of a DICOM file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def pixel_data_header(count: int) -> bytes:
    """The element header of PixelData (7FE0,0010) as OW, explicit VR little endian, of count bytes."""
    return b"\xe0\x7f\x10\x00OW\x00\x00" + count.to_bytes(4, "little")
