"""The pipeline graph against the Python reference of the same pipeline (runtime/inference.py) run with the stages'
networks: the masks users get from each, compared on real scans. Needs no PyTorch."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from heartseg.runtime.errors import HeartsegError
from heartseg.runtime.formats.nifti import load_volume
from heartseg.runtime.inference import infer_canonical
from heartseg.runtime.metrics import dice_score
from heartseg.runtime.postprocess import mask_from_prob
from heartseg.runtime.preprocess import from_canonical, to_canonical
from heartseg.runtime.session import OnnxSession

# The graph finds the largest component on the final stage's grid, not the scan's, and caps the final stage's box
# (export/pipeline_graph.py): its masks may differ from the reference's by a few voxels, never by more than this in
# Dice.
MIN_GRAPH_DICE = 0.995


class ParityError(HeartsegError):
    """ONNX Runtime does not reproduce the reference: the export is refused."""

    exit_code = 1


@dataclass
class GraphParityResult:
    """One scan through the pipeline graph and through the Python reference with the same networks."""

    what: str
    shape: tuple[int, ...]
    dice: float
    mask_agreement: float
    max_abs_diff: float
    min_dice: float = MIN_GRAPH_DICE

    @property
    def ok(self) -> bool:
        """The masks agree to at least min_dice."""
        return self.dice >= self.min_dice

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {**asdict(self), "ok": self.ok}


def compare_graph(scan: Path, reference: OnnxSession, graph: OnnxSession,
                  min_dice: float = MIN_GRAPH_DICE) -> GraphParityResult:
    """One scan's mask from the graph against the reference's, both mapped back to the scan's own grid."""
    contract = reference.contract
    canonical = to_canonical(load_volume(scan), contract.orientation)
    prob = infer_canonical(canonical, contract, reference.predict).prob
    out = graph.segment(canonical.data, canonical.spacing)
    ref_mask = from_canonical(mask_from_prob(prob, contract), canonical) > 0
    got_mask = from_canonical(out.mask, canonical) > 0
    diff = float(np.max(np.abs(prob.astype(np.float64) - out.prob.astype(np.float64)))) if prob.size else 0.0
    return GraphParityResult(f"{Path(scan).name}: pipeline graph", tuple(int(s) for s in ref_mask.shape),
                             dice_score(got_mask, ref_mask), float(np.mean(got_mask == ref_mask)), diff, min_dice)


def check_graph_parity(networks: Path, pipeline: Path, scans: list[Path], threads: int | None = None,
                       min_dice: float = MIN_GRAPH_DICE) -> list[GraphParityResult]:
    """The pipeline file's masks against the Python reference run with the networks file's per-stage calls, on
    each scan (ONNX Runtime on the CPU); ParityError when one agrees below min_dice."""
    if not scans:
        return []
    reference = OnnxSession(networks, device="cpu", threads=threads)
    graph = OnnxSession(pipeline, device="cpu", threads=threads)
    results = [compare_graph(scan, reference, graph, min_dice) for scan in scans]
    failed = [r for r in results if not r.ok]
    if failed:
        lines = "; ".join(f"{r.what}: Dice {r.dice:.4f} (at least {r.min_dice} needed)" for r in failed)
        raise ParityError(f"the pipeline graph's masks do not match the reference pipeline's ({lines})")
    return results
