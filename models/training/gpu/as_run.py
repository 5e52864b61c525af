"""Give fine-stage weights trained from a pack (train_packed.py) the run folder that --init-from reads.

    python models/training/gpu/as_run.py --weights OUT/A/fine.pt --record OUT/A/run.json \\
        --run-config runs/la8/config.json --init-from runs/la8/fold_0/model.pt -o runs/la9-gpu
    heartseg-train ../shared/data/Task02_Heart ../shared/data/LA2018 -o runs/la9 --fold 0 \\
        --splits models/training/splits.json --init-from runs/la9-gpu/fold_0/fine/best.pt \\
        --init-from runs/la5/fold_0/coarse/best.pt --steps 0 --coarse-steps 0

The folder holds the packed run's plan and splits, and a config.json with the recipe the weights were
trained by (so that the cases they trained on, and the weights they started from, are traced).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from heartseg.train.augment import AugmentConfig
from heartseg.train.pipeline import RunConfig
from heartseg.train.trainer import TrainConfig


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help="fine.pt from train_packed.py")
    parser.add_argument("--record", type=Path, required=True, help="run.json from train_packed.py")
    parser.add_argument("--run-config", type=Path, required=True, help="config.json of the run that was packed")
    parser.add_argument("--init-from", type=Path, help="this machine's copy of the model.pt the packed training "
                        "started from (run.json names the path on the machine that trained)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    if args.output.exists():
        raise SystemExit(f"error: {args.output} exists")
    record = json.loads(args.record.read_text())
    packed = RunConfig.load(args.run_config)
    augment = AugmentConfig(**record["augment"])
    config = replace(packed, output=str(args.output), fine=TrainConfig(**record["config"]), augment=augment,
                     init_from=[str(args.init_from or record["init_from"])] if record["init_from"] else [],
                     command=f"models/training/gpu/train_packed.py ({record['device']}, {record['steps']} steps)")
    stage_dir = args.output / f"fold_{record['fold']}" / "fine"
    stage_dir.mkdir(parents=True)
    for name in ("plan.json", "splits.json"):
        shutil.copyfile(args.run_config.parent / name, args.output / name)
    config.save(args.output / "config.json")
    shutil.copyfile(args.weights, stage_dir / "best.pt")
    shutil.copyfile(args.record, stage_dir / "run.json")
    print(f"{stage_dir / 'best.pt'}: give it to heartseg-train --init-from")


if __name__ == "__main__":
    main()
