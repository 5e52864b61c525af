"""Pack fold 0's prepared fine-stage training cases for a GPU machine that cannot hold the datasets.

Each case keeps the region of its fine-stage grid that the patch sampler can read (the atrium's box
plus 48 voxels on every side, inside the scan), quantised to uint8 over its own range (256 levels, as
the uint8 scans it was resampled from; error at most 1/510 of the range), in one xz-compressed npz with
the plan, the network and the augmentation.

    python models/training/gpu/pack.py --run-config runs/la8/config.json --out .gpu/pack.npz.xz
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
from pathlib import Path

import numpy as np
from heartseg.runtime.preprocess import mask_box
from heartseg.train.pipeline import Run, RunConfig

# The sampler reads at most 3/4 of a 64-voxel patch beyond a foreground voxel (centre jitter of a
# quarter patch), and 20 voxels beyond the box (15 mm margin + 10 mm jitter at 1.25 mm).
REACH = 48


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", type=Path, required=True, help="config.json of the run whose plan and fold to pack")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    run = Run(RunConfig.load(args.run_config), log=print)
    plan, folds = run.prepare()
    fold = folds[args.fold]
    stage = plan.contract.final_stage
    arrays, meta = {}, []
    for case in run.load_cases(plan.contract, fold.train):
        image, label = (np.asarray(a) for a in case.stages[stage.name])
        lo, hi = mask_box(label)
        lo, hi = np.maximum(lo - REACH, 0), np.minimum(hi + REACH, label.shape)
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
        "fine_unet": run.config.fine_unet.to_dict(), "augment": json.loads(json.dumps(run.config.augment.__dict__)),
    }).encode(), np.uint8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    args.out.write_bytes(lzma.compress(buffer.getvalue(), preset=6))
    print(f"{args.out}: {len(meta)} cases, {args.out.stat().st_size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
