"""Atomic writes: a writer killed with SIGKILL leaves a hidden temporary file that the next write of the
same output removes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from heartseg.runtime.atomic import atomic_output, remove_stale_temporaries, write_text_atomic
from heartseg.runtime.formats.nifti import save_volume


def temporaries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if ".tmp" in p.name)


def test_sigkill_during_a_write_leaves_nothing_after_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "mask.nii.gz"
    code = textwrap.dedent(f"""
        import os, signal
        from heartseg.runtime.atomic import atomic_output
        with atomic_output({str(target)!r}) as tmp:
            tmp.write_bytes(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ}, capture_output=True)
    assert done.returncode == -signal.SIGKILL
    left = temporaries(tmp_path)
    assert len(left) == 1 and left[0].name.startswith(".mask.nii.gz.")  # what the kill left behind
    assert not target.exists()
    save_volume(np.zeros((4, 4, 4), np.uint8), np.eye(4), target)
    assert target.is_file() and temporaries(tmp_path) == []


def test_live_writers_temporaries_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    with atomic_output(target) as tmp:
        tmp.write_text("in progress")
        assert remove_stale_temporaries(target) == []  # our own process is alive
        assert tmp.exists()
    assert target.read_text() == "in progress" and temporaries(tmp_path) == []
    write_text_atomic(target, "again")
    assert target.read_text() == "again"
