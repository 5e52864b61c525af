"""The inference runtime must not import torch (it ships without it)."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "heartseg",
    "heartseg.runtime.cli_infer",
    "heartseg.runtime.cli_bench",
    "heartseg.runtime.pipeline",
    "heartseg.runtime.formats",
    "heartseg.runtime.statistics",
    "heartseg.runtime.mesh",
    "heartseg.runtime.cli_eval",
    "heartseg.runtime.cli_common",
    "heartseg.runtime.segmenter",
    "heartseg.runtime.session",
    "heartseg.runtime.inference",
    "heartseg.runtime.metrics",
]


def test_runtime_imports_without_torch() -> None:
    code = (
        "import sys; "
        + "; ".join(f"import {m}" for m in MODULES)
        + "; from heartseg import Segmenter"
        + "; bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_cli_runs_without_torch_importable(tmp_path) -> None:
    """Even with torch made unimportable, the CLIs load and print their help."""
    code = (
        "import sys; sys.modules['torch'] = None; "  # any 'import torch' now raises ImportError
        "from typer.testing import CliRunner; "
        "from heartseg.runtime.cli_infer import app as infer; from heartseg.runtime.cli_eval import app as ev; "
        "r = CliRunner(); a = r.invoke(infer, ['--help']); b = r.invoke(ev, ['--help']); "
        "assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
