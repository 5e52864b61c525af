"""Pack a fold's prepared fine-stage training cases for a GPU machine that cannot hold the datasets.

Each case keeps the region of its fine-stage grid that the patch sampler can read (the atrium's box
plus the sampler's reach on every side, inside the scan: 48 voxels for a 64^3 patch), quantised to
uint8 over its own range (256 levels, as the uint8 scans it was resampled from; error at most 1/510 of
the range), in one xz-compressed npz with the plan, the network and the augmentation. One difference
remains: a patch reaching past the scan's edge is padded with the region's darkest value rather than
the whole scan's.

    python models/training/gpu/pack.py --run-config runs/la8/config.json --out .gpu/pack.npz.xz
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
from dataclasses import asdict
from pathlib import Path

import numpy as np
from heartseg.runtime.contract import StageContract
from heartseg.runtime.preprocess import mask_box
from heartseg.train.pipeline import Run, RunConfig
from heartseg.train.sampler import sampler_reach


def sampler_reach_of(stage: StageContract) -> np.ndarray:
    """The sampler's reach around the box; a stage without a crop margin draws patches from the whole scan."""
    if stage.crop_margin_mm <= 0:
        raise SystemExit(f"error: stage {stage.name!r} has no crop margin: its patches come from the whole scan")
    return sampler_reach(stage)


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", type=Path, required=True, help="config.json of the run whose plan and fold to pack")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run = Run(RunConfig.load(args.run_config), log=print)
    plan, folds = run.prepare()
    fold = folds[args.fold]
    stage = plan.contract.final_stage
    reach = sampler_reach_of(stage)
    arrays, meta = {}, []
    for case in run.load_cases(plan.contract, fold.train):
        image, label = (np.asarray(a) for a in case.stages[stage.name])
        box = mask_box(label)
        if box is None:
            raise SystemExit(f"error: {case.case_id}: empty label (the pack keeps the region around the atrium)")
        lo, hi = np.maximum(box[0] - reach, 0), np.minimum(box[1] + reach, label.shape)
        region = tuple(slice(a, b) for a, b in zip(lo, hi))
        crop = image[region].astype(np.float64)
        offset, scale = float(crop.min()), float(crop.max() - crop.min()) / 255 or 1.0
        arrays[f"{case.case_id}.image"] = np.round((crop - offset) / scale).astype(np.uint8)
        arrays[f"{case.case_id}.label"] = label[region].astype(np.uint8)
        meta.append({"case_id": case.case_id, "dataset": case.dataset, "spacing": list(case.spacing),
                     "offset": offset, "scale": scale, "full_shape": list(label.shape), "region_lo": lo.tolist()})
    arrays["meta"] = np.frombuffer(json.dumps({
        "cases": meta, "fold": fold.index, "train_cases": fold.train, "stage": stage.name,
        "contract": json.loads((run.dir / "plan.json").read_text())["contract"],
        "fine_unet": run.config.fine_unet.to_dict(), "augment": asdict(run.config.augment),
    }).encode(), np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    args.out.write_bytes(lzma.compress(buffer.getvalue(), preset=6))
    print(f"{args.out}: {len(meta)} cases, {args.out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
