"""The hint for a missing optional library names a real package and a real extra of pyproject.toml."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from heartseg.runtime.errors import InputError
from heartseg.runtime.formats.base import optional_import

EXTRAS = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["optional-dependencies"]


@pytest.mark.parametrize(("module", "package", "extra"), [
    ("skimage.measure", "scikit-image", "mesh"),
    ("nrrd", "pynrrd", "nrrd"),
    ("pydicom.sr.codedict", "pydicom", "dicom"),
])
def test_missing_module_hint_names_package_and_extra(monkeypatch: pytest.MonkeyPatch, module: str, package: str,
                                                     extra: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(InputError) as info:
        optional_import(module, "this feature")
    message = str(info.value)
    assert f"pip install {package}" in message
    assert f"'.[{extra}]'" in message
    assert any(dep.split(">")[0].split("=")[0] == package for dep in EXTRAS[extra])
    assert "heartseg[" not in message  # heartseg is not on a registry: no 'pip install heartseg[...]'
