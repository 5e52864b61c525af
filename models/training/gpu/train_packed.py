"""Train the fine stage on a GPU from a pack (pack.py), for a fixed time instead of a fixed number of steps.

The loop is heartseg's own (train.trainer.train_stage, the same sampler, augmentation, loss and
schedule as `heartseg-train --device cuda`); the pack stands in for the datasets and there is no
validation (the held-out cases stay behind: the weights are calibrated and evaluated where they are).
A probe of --probe-steps measures the step time, and the run then gets the steps that fit --seconds.

    python models/training/gpu/train_packed.py --pack .gpu/pack.npz.xz --out OUT --seconds 400 \\
        [--init-from model.pt] --batch-size 16 --lr 5e-4 --workers 6
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from heartseg.runtime.contract import ModelContract
from heartseg.train.augment import AugmentConfig
from heartseg.train.cache import PreparedCase
from heartseg.train.checkpoint import read_last
from heartseg.train.model_files import read_model
from heartseg.train.trainer import TrainConfig, train_stage
from heartseg.train.unet import UNetConfig


def load_pack(path: Path) -> tuple[dict, list[PreparedCase]]:
    """The pack's metadata and its cases (fine-stage grids only, dequantised to float32)."""
    pack = np.load(io.BytesIO(lzma.decompress(Path(path).read_bytes())))
    meta = json.loads(bytes(pack["meta"]).decode())
    spacing = tuple(next(s for s in meta["contract"]["stages"] if s["name"] == meta["stage"])["spacing"])
    cases = []
    for m in meta["cases"]:
        image = (pack[f"{m['case_id']}.image"].astype(np.float32) * np.float32(m["scale"]) + np.float32(m["offset"]))
        label = pack[f"{m['case_id']}.label"]
        cases.append(PreparedCase(m["case_id"], image, label, spacing, {meta["stage"]: (image, label)}, m["dataset"]))
    return meta, cases


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for fine.pt (the weights) and run.json")
    parser.add_argument("--seconds", type=float, required=True, help="training time after the probe")
    parser.add_argument("--init-from", type=Path, help="model.pt whose fine stage to start from (else from scratch)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--flip-prob", type=float)
    parser.add_argument("--permute-prob", type=float)
    parser.add_argument("--probe-steps", type=int, default=60)
    parser.add_argument("--max-steps", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--stop-after", type=float, help="seconds after the start at which to stop and keep the last "
                        "checkpoint (default: --seconds + 150)")
    args = parser.parse_args()
    if args.probe_steps < 4:
        parser.error("--probe-steps must be at least 4 (the second half of the probe is timed)")
    started = time.time()
    torch.backends.cudnn.benchmark = True
    meta, cases = load_pack(args.pack)
    contract = ModelContract.from_dict(meta["contract"])
    stage = next(s for s in contract.stages if s.name == meta["stage"])
    unet = UNetConfig.from_dict(meta["fine_unet"])
    augment = AugmentConfig(**meta["augment"])
    augment = replace(augment, **{k: v for k, v in (("p_flip", args.flip_prob), ("p_permute", args.permute_prob))
                                  if v is not None})
    init = None
    if args.init_from:
        init = read_model(args.init_from).networks[stage.name][0].state_dict
    base = TrainConfig(steps=args.probe_steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                       checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device, amp=args.device == "cuda",
                       workers=args.workers)
    print(f"{len(cases)} cases loaded in {time.time() - started:.1f} s; augment {augment}", flush=True)

    times: list[float] = []

    def probe_progress(step, total, loss, score):
        times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        train_stage(Path(tmp) / "probe", stage, contract, unet, cases, [], base, augment, probe_progress,
                    init_state=init)
    half = len(times) // 2
    step_seconds = (times[-1] - times[half]) / max(1, len(times) - 1 - half)
    steps = int(min(args.max_steps, args.seconds / step_seconds) // 100 * 100)
    config = replace(base, steps=max(steps, 100))
    print(f"probe: {step_seconds * 1000:.1f} ms/step at batch {args.batch_size}; training {config.steps} steps",
          flush=True)

    losses: list[float] = []
    stop_after = args.stop_after if args.stop_after is not None else args.seconds + 150

    def progress(step, total, loss, score):
        losses.append(loss)
        if step % 200 == 0 or step == total:
            print(f"step {step}/{total}: loss {np.mean(losses[-200:]):.4f} ({time.time() - started:.0f} s)",
                  flush=True)
        if time.time() - started > stop_after:
            raise TimeoutError(f"stopped at step {step} of {total}: past --stop-after")

    args.out.mkdir(parents=True, exist_ok=True)
    stopped = ""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            outcome = train_stage(Path(tmp) / stage.name, stage, contract, unet, cases, [], config, augment, progress,
                                  init_state=init)
            state, steps, seconds = outcome.state_dict, outcome.steps, outcome.seconds
        except TimeoutError as exc:
            if not (Path(tmp) / stage.name / "last.pt").is_file():
                raise
            stopped = str(exc)
            last = read_last(Path(tmp) / stage.name / "last.pt")
            state, steps, seconds = last["model"], last["state"]["step"], last["state"]["seconds"]
            print(f"{stopped}; kept the checkpoint of step {steps}", flush=True)
    torch.save({"model": state, "step": steps, "dice": float("nan")}, args.out / "fine.pt")
    record = {"config": asdict(config), "augment": asdict(augment), "init_from": str(args.init_from or ""),
              "probe_ms_per_step": step_seconds * 1000, "steps": steps, "seconds": seconds, "stopped": stopped,
              "seconds_per_step": seconds / max(1, steps), "patches": steps * config.batch_size,
              "loss_per_100_steps": [float(np.mean(losses[i:i + 100])) for i in range(0, len(losses), 100)],
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "cases": len(cases), "fold": meta["fold"],
              "train_cases": meta["train_cases"]}
    (args.out / "run.json").write_text(json.dumps(record, indent=1))
    print(f"done: {steps} steps in {seconds:.0f} s ({time.time() - started:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()
