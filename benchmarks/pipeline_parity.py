"""The end-to-end graph against the Python reference pipeline, on the held-out scans of the model's fold.

For every held-out case named in the model's metadata (both datasets), the mask of the pipeline graph (what
heartseg-infer and every ONNX Runtime client run) is compared with the mask of the Python reference
(runtime/inference.py with the same file's networks, taken back out of the graph), and both are scored against
the label. Prints one JSON line per case and a summary per dataset; --json writes them all.

    python benchmarks/pipeline_parity.py [--model models/heartseg-la.onnx] [--data ../shared/data] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from heartseg.export.pipeline_file import unwrap
from heartseg.export.stamp import write_model
from heartseg.runtime.formats.nifti import load_label, load_volume
from heartseg.runtime.inference import infer_canonical
from heartseg.runtime.metrics import dice_score
from heartseg.runtime.postprocess import mask_from_prob
from heartseg.runtime.preprocess import from_canonical, to_canonical
from heartseg.runtime.session import OnnxSession, read_contract

# The agreement every held-out case must reach (Dice between the graph's mask and the reference's).
MIN_AGREEMENT = 0.995


def held_out_scans(model: Path, data: Path) -> list[tuple[str, Path, Path]]:
    """(dataset, scan, label) of each held-out case the model's metadata names."""
    contract, _ = read_contract(model)
    found = []
    for case in contract.info.get("val_cases", "").split(","):
        for dataset in sorted(p.name for p in data.iterdir() if p.is_dir()):
            scan = data / dataset / "imagesTr" / f"{case}.nii.gz"
            if scan.is_file():
                found.append((dataset, scan, data / dataset / "labelsTr" / scan.name))
    return found


def compare(model: Path, data: Path, threads: int = 2) -> dict:
    """Per-case agreement and Dice of both paths, and their means per dataset."""
    with tempfile.TemporaryDirectory() as tmp:
        networks = write_model(unwrap(onnx.load(str(model)), model), Path(tmp) / "networks.onnx")
        reference = OnnxSession(networks, device="cpu", threads=threads)
        graph = OnnxSession(model, device="cpu", threads=threads)
        rows = []
        for dataset, scan, label_path in held_out_scans(model, data):
            volume = load_volume(scan)
            label = load_label(label_path).data > 0
            canonical = to_canonical(volume)
            start = time.perf_counter()
            prob = infer_canonical(canonical, reference.contract, reference.predict).prob
            ref = from_canonical(mask_from_prob(prob, reference.contract), canonical) > 0
            ref_seconds = time.perf_counter() - start
            start = time.perf_counter()
            out = graph.segment(canonical.data, canonical.spacing)
            mask = from_canonical(out.mask, canonical) > 0
            graph_seconds = time.perf_counter() - start
            row = {"dataset": dataset, "case": scan.name, "agreement": dice_score(mask, ref),
                   "dice_reference": dice_score(ref, label), "dice_graph": dice_score(mask, label),
                   "seconds_reference": ref_seconds, "seconds_graph": graph_seconds}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        mine = [r for r in rows if r["dataset"] == dataset]
        summary[dataset] = {key: float(np.mean([r[key] for r in mine])) for key in
                            ("dice_reference", "dice_graph", "seconds_reference", "seconds_graph")}
        summary[dataset].update(cases=len(mine), min_agreement=min(r["agreement"] for r in mine))
    return {"model": str(model), "min_agreement_required": MIN_AGREEMENT, "cases": rows, "datasets": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(__file__).parents[1] / "models" / "heartseg-la.onnx")
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = compare(args.model, args.data)
    for dataset, numbers in result["datasets"].items():
        print(f"{dataset}: {numbers['cases']} cases, agreement >= {numbers['min_agreement']:.4f}, Dice graph "
              f"{numbers['dice_graph']:.4f} reference {numbers['dice_reference']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(n["min_agreement"] >= MIN_AGREEMENT for n in result["datasets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
