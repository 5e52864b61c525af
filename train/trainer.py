"""Training of one network of the cascade: the loop, validation through the runtime path, checkpoints."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from heartseg.runtime.atomic import write_text_atomic
from heartseg.runtime.contract import LOCALISER, ModelContract, StageContract
from heartseg.runtime.errors import HeartsegError
from heartseg.runtime.inference import StagePredictFn, infer_canonical, predict_stage
from heartseg.runtime.metrics import compute_metrics, dice_score
from heartseg.runtime.preprocess import CanonicalVolume
from torch import nn

from .augment import AugmentConfig
from .cache import PreparedCase
from .checkpoint import read_best, read_last, save_atomic
from .losses import DiceBCELoss
from .options import COARSE_TRAIN, TrainConfig  # noqa: F401  (TrainConfig is part of this module's API)
from .sampler import BackgroundBatches, PatchSampler, SamplerConfig, WorkerBatches
from .unet import UNetConfig, build_unet


class TrainingFailed(HeartsegError):
    """Training diverged: reported with exit code 1, the last good checkpoint kept."""

    exit_code = 1


@dataclass
class StageOutcome:
    """What a finished stage leaves behind."""

    stage: str
    unet: dict
    state_dict: dict
    best_step: int
    best_dice: float
    steps: int
    seconds: float
    seconds_per_step: float
    history: dict = field(default_factory=dict)


def pick_device(name: str) -> torch.device:
    """auto: CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise HeartsegError("--device cuda: PyTorch sees no CUDA device here")
    return torch.device(name)


def canonical_of(case: PreparedCase) -> CanonicalVolume:
    """A prepared case as the runtime's canonical volume (already reoriented: identity transform)."""
    identity = np.array([[0, 1], [1, 1], [2, 1]], float)
    return CanonicalVolume(np.asarray(case.image), case.spacing, identity, tuple(case.image.shape))


def torch_predictor(networks: dict[str, nn.Module], device: torch.device, amp: bool = True) -> StagePredictFn:
    """A runtime stage-prediction function backed by PyTorch networks (sigmoid of the logits).

    amp=False keeps float32 on CUDA too: calibration must see what the exported fp32 graph computes.
    """

    @torch.no_grad()
    def predict(stage_name: str, batch: np.ndarray) -> np.ndarray:
        net = networks[stage_name]
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).contiguous(memory_format=torch.channels_last_3d)
        with _autocast(device) if amp else torch.autocast(device.type, enabled=False):
            logits = net(x)
        return torch.sigmoid(logits.float()).cpu().numpy()

    return predict


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def validation_pairs(stage: StageContract, contract: ModelContract, cases: list[PreparedCase],
                     predict: StagePredictFn) -> list[tuple[np.ndarray, np.ndarray]]:
    """(probability, label) per held-out case, from the runtime's inference path at full size (not patches).

    A localiser is judged on its own grid; a fine stage on the native grid inside the label's box,
    as the cascade will crop it; a single stage on the whole native scan.
    """
    pairs = []
    solo = ModelContract(stages=[stage], orientation=contract.orientation, normalization=contract.normalization)
    for case in cases:
        canonical = canonical_of(case)
        if stage.role == LOCALISER:
            pairs.append((predict_stage(canonical, stage, solo, predict), np.asarray(case.stages[stage.name][1])))
        else:
            box = case.box if stage.crop_margin_mm > 0 else None
            prob = infer_canonical(canonical, solo, predict, box=box).prob
            pairs.append((prob, np.asarray(case.label)))
    return pairs


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return max(0.0, 1.0 - (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)) ** 0.9


def _rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


ProgressFn = Callable[[int, int, float, float | None], None]


def train_stage(stage_dir: Path, stage: StageContract, contract: ModelContract, unet_config: UNetConfig,
                train_cases: list[PreparedCase], val_cases: list[PreparedCase], config: TrainConfig,
                augment_config: AugmentConfig, progress: ProgressFn | None = None,
                writer=None, init_state: dict | None = None, log: Callable[[str], None] | None = None) -> StageOutcome:
    """Train one stage, resuming from stage_dir/last.pt when it exists; keeps the best validation checkpoint.

    init_state (weights of the same architecture) starts a new stage from existing weights (fine-tuning);
    with 0 steps the stage keeps them as they are.
    """
    stage_dir.mkdir(parents=True, exist_ok=True)
    rank, world = _rank()
    device = pick_device(config.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(config.seed + rank)
    model = build_unet(unet_config).to(device).to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    use_scaler = config.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    loss_fn = DiceBCELoss(config.dice_weight, config.bce_weight)

    if config.steps == 0 and init_state is None:
        raise HeartsegError(f"{stage.name}: 0 training steps keep --init-from weights, and none were given")
    state = {"step": 0, "best_dice": -1.0, "best_step": -1, "seconds": 0.0, "loss": [], "val": []}
    last = stage_dir / "last.pt"
    if init_state is not None and not last.exists():
        try:
            model.load_state_dict(init_state)
        except RuntimeError as exc:
            raise HeartsegError(f"{stage.name}: --init-from weights do not fit this network "
                                f"({str(exc).splitlines()[0][:200]})") from None
    if last.exists():
        ckpt = read_last(last)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise HeartsegError(f"{last}: does not fit this run's network or optimiser "
                                f"({str(exc).splitlines()[0][:200]}); delete it to restart the stage") from None
        state = ckpt["state"]
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    batches = None
    # A stage with no steps left (weights kept as given, a finished stage recalibrated) samples no patches.
    if state["step"] < config.steps:
        seed = config.seed * 1000003 + state["step"] * 31 + rank
        sampler = PatchSampler(train_cases, stage, SamplerConfig(config.batch_size, config.foreground_fraction,
                                                                 config.dataset_weights or None,
                                                                 soft_labels=config.soft_labels),
                               augment_config, seed=seed)
        batches = (WorkerBatches(sampler, config.workers, seed, pin_memory=device.type == "cuda") if config.workers
                   else BackgroundBatches(sampler))
    started = time.perf_counter() - state["seconds"]

    def save_last() -> None:
        state["seconds"] = time.perf_counter() - started
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "state": state}, last)

    def validate() -> float:
        model.eval()
        pairs = validation_pairs(stage, contract, val_cases, torch_predictor({stage.name: model}, device))
        model.train()
        dices = [dice_score(p > 0.5, ref) for p, ref in pairs]
        score = float(np.mean(dices))
        spacings = [stage.spacing if stage.role == LOCALISER else case.spacing for case in val_cases]
        hd95 = [compute_metrics(p > 0.5, ref, sp).hd95_mm for (p, ref), sp in zip(pairs, spacings)]
        hd95_mean = float(np.nanmean(hd95)) if np.isfinite(hd95).any() else float("nan")
        state["val"].append([state["step"], score])
        state.setdefault("val_hd95", []).append([state["step"], hd95_mean])
        by_dataset = {name: float(np.mean([d for d, c in zip(dices, val_cases) if c.dataset == name]))
                      for name in sorted({c.dataset for c in val_cases})}
        state.setdefault("val_by_dataset", []).append([state["step"], by_dataset])
        if writer:
            writer.add_scalar(f"{stage.name}/val_dice", score, state["step"])
            writer.add_scalar(f"{stage.name}/val_hd95_mm", hd95_mean, state["step"])
            for name, value in by_dataset.items():
                writer.add_scalar(f"{stage.name}/val_dice/{name or 'data'}", value, state["step"])
        if log:
            parts = ", ".join(f"{name} {value:.4f}" for name, value in by_dataset.items())
            log(f"{stage.name} step {state['step']}: validation Dice {score:.4f} ({parts}), HD95 {hd95_mean:.1f} mm")
        if score > state["best_dice"]:
            state["best_dice"], state["best_step"] = score, state["step"]
            save_atomic({"model": model.state_dict(), "step": state["step"], "dice": score}, stage_dir / "best.pt")
        return score

    try:
        if config.steps == 0 and rank == 0 and val_cases and not (stage_dir / "best.pt").exists():
            validate()  # the kept weights' validation Dice, and their best.pt
        model.train()
        while state["step"] < config.steps:
            images, labels = batches.next()
            images = images.to(device).contiguous(memory_format=torch.channels_last_3d)
            labels = labels.to(device).contiguous(memory_format=torch.channels_last_3d)
            with _autocast(device) if config.amp else torch.autocast(device.type, enabled=False):
                logits = net(images)
            loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            state["step"] += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingFailed(f"{stage.name}: the loss became {value} at step {state['step']}; "
                                     "lower --lr and resume, or start again")
            state["loss"].append(value)
            if writer and rank == 0:
                writer.add_scalar(f"{stage.name}/loss", value, state["step"])
                writer.add_scalar(f"{stage.name}/lr", scheduler.get_last_lr()[0], state["step"])
            score = None
            if rank == 0 and val_cases and (state["step"] % config.val_every == 0 or state["step"] == config.steps):
                score = validate()
            if rank == 0 and (state["step"] % config.checkpoint_every == 0 or state["step"] == config.steps):
                save_last()
            if progress and rank == 0:
                progress(state["step"], config.steps, value, score)
    finally:
        if batches is not None:
            batches.close()
    if rank == 0 and not val_cases:
        save_atomic({"model": model.state_dict(), "step": state["step"], "dice": float("nan")}, stage_dir / "best.pt")
    if world > 1:
        torch.distributed.barrier()
    best = read_best(stage_dir / "best.pt")
    seconds = time.perf_counter() - started
    outcome = StageOutcome(stage.name, unet_config.to_dict(), best["model"], int(best["step"]), float(best["dice"]),
                           state["step"], seconds, seconds / max(1, state["step"]),
                           {"loss": state["loss"], "val": state["val"], "val_hd95": state.get("val_hd95", []),
                            "val_by_dataset": state.get("val_by_dataset", [])})
    if rank == 0:
        write_text_atomic(stage_dir / "done.json", json.dumps({k: v for k, v in asdict(outcome).items()
                                                         if k not in ("state_dict", "history")}, indent=1))
    return outcome
