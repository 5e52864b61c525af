"""heartseg: left-atrium segmentation in 3D cardiac MRI.

    from heartseg import Segmenter
    result = Segmenter().predict("scan.nii.gz")      # or a DICOM folder, a nibabel / SimpleITK image, an array

    from heartseg import segment_files
    segment_files(Segmenter(), ["scans/"], "out/")    # files in, files out, as heartseg-infer writes them

The subpackages are heartseg.runtime (inference, no PyTorch), heartseg.train, heartseg.export and
heartseg.models; importing heartseg itself loads none of them until Segmenter is asked for.
"""

from __future__ import annotations

from pkgutil import extend_path
from typing import Any

# The subpackages live in their own top-level folders (runtime/, train/, ...) and are mapped into
# heartseg by the installer; a source checkout on sys.path contributes them through extend_path.
__path__ = extend_path(__path__, __name__)

__all__ = ["Segmenter", "SegmentationResult", "segment_files", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from heartseg.runtime import __version__

        return __version__
    if name in ("Segmenter", "SegmentationResult"):
        from heartseg.runtime import segmenter

        return getattr(segmenter, name)
    if name == "segment_files":
        from heartseg.runtime import pipeline

        return pipeline.segment_files
    raise AttributeError(f"module 'heartseg' has no attribute {name!r}")
