"""heartseg-train: train a 3D U-Net (cascade or single stage) on an MSD-layout dataset."""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

import typer
from heartseg.runtime.cli_common import new_app, version_option
from heartseg.runtime.errors import HeartsegError

from .options import COARSE_TRAIN, FOLDS, SEED, STAGE_KIND, AugmentConfig, ConfigError, TrainConfig
from .plan import PlanOptions

# Every default below is the config dataclasses' own (this module imports no PyTorch, so that it can say
# that PyTorch is missing).
_FINE, _COARSE, _PLAN, _AUGMENT = TrainConfig(), TrainConfig(**COARSE_TRAIN), PlanOptions(), AugmentConfig()

app = new_app(help="Train a left-atrium 3D U-Net with cross-validation and a calibrated threshold.")


def _weights(items: list[str] | None) -> dict[str, float]:
    """--dataset-weight NAME=W options as a dict."""
    weights: dict[str, float] = {}
    for item in items or []:
        name, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not name.strip() or weight is None:
            raise HeartsegError(f"--dataset-weight {item!r}: give NAME=W, e.g. LA2018=3")
        weights[name.strip()] = weight
    return weights


def _triple(text: str | None, kind=float):
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").split(",") if p]
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or any(v <= 0 for v in values):
        raise HeartsegError(f"expected three positive comma-separated numbers, got {text!r}")
    return values


def _pair(text: str, option: str) -> tuple[float, float]:
    try:
        values = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        values = ()
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise HeartsegError(f"{option} {text!r}: expected two comma-separated numbers, 'low,high', with "
                            "0 < low <= high")
    return values  # type: ignore[return-value]


def _progress_factory(console):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    def factory(title: str, total: int):
        progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]:.4f}  val Dice {task.fields[dice]}"),
                            TimeElapsedColumn(), TimeRemainingColumn(), console=console,
                            disable=not console.is_terminal and os.environ.get("HEARTSEG_PROGRESS") != "1")
        task = progress.add_task(title, total=total, loss=float("nan"), dice="-")
        progress.start()
        last_dice = ["-"]

        def update(step: int, steps: int, loss: float, dice: float | None) -> None:
            if dice is not None:
                last_dice[0] = f"{dice:.3f}"
            progress.update(task, completed=step, loss=loss, dice=last_dice[0])
            if step >= steps:
                progress.stop()
            elif not console.is_terminal and step % 20 == 0:
                console.log(f"{title}: step {step}/{steps} loss {loss:.4f} val Dice {last_dice[0]}")

        return update

    return factory


@app.command()
def train(
    ctx: typer.Context,
    data: Optional[List[Path]] = typer.Argument(None, help="Dataset folder(s) in MSD layout (dataset.json, imagesTr/, labelsTr/). Several folders train one model: sampling is balanced per dataset, folds are stratified by dataset, and every report is broken down per dataset."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Run folder to create (plan, splits, checkpoints, model.pt, logs, PNGs)."),
    resume: Optional[Path] = typer.Option(None, help="Continue the run in this folder from its last checkpoints (other options are ignored)."),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="With --resume: calibrate, evaluate and write model.pt again for finished folds, from their trained networks, with this version of heartseg's inference (no training)."),
    stage: str = typer.Option(STAGE_KIND, help="cascade (localiser at low resolution, then full resolution around it), single, coarse or fine."),
    fold: Optional[str] = typer.Option(None, help="Fold(s) to train: a number (default 0), a list like 1,2 or 'all'. With --resume, widens the run to these folds (finished folds are kept)."),
    folds: int = typer.Option(FOLDS, help="Number of cross-validation folds (cases with identical images share a fold)."),
    seed: int = typer.Option(SEED, help="Seed of the split, the initialisation and the sampling."),
    steps: int = typer.Option(_FINE.steps, help="Training steps of the full-resolution (fine or single) network; 0 keeps its --init-from weights as they are (calibrated and evaluated, not trained)."),
    coarse_steps: int = typer.Option(_COARSE.steps, help="Training steps of the localiser; 0 keeps its --init-from weights as they are."),
    batch_size: int = typer.Option(_FINE.batch_size, help="Patches per step."),
    lr: float = typer.Option(_FINE.lr, help="Peak AdamW learning rate (linear warm-up, then polynomial decay)."),
    val_every: int = typer.Option(_FINE.val_every, help="Validate on the fold's held-out cases every N steps (full volumes, runtime path)."),
    checkpoint_every: int = typer.Option(_FINE.checkpoint_every, help="Write last.pt every N steps (the most a kill can lose)."),
    preset: str = typer.Option("fine", help="Network preset of the full-resolution stage: fine (16 ch), coarse (8 ch), failed-project (32 ch)."),
    width: Optional[int] = typer.Option(None, help="Base channels of the full-resolution network (overrides the preset)."),
    norm: Optional[str] = typer.Option(None, help="Normalisation layers: batch, instance or none (overrides the preset)."),
    fine_spacing: Optional[str] = typer.Option(None, help="Full-resolution spacing in mm, 'x,y,z' (default: the dataset's median)."),
    coarse_spacing: Optional[float] = typer.Option(None, help="Localiser spacing in mm (default: about 80 voxels across the median scan)."),
    patch: Optional[str] = typer.Option(None, help="Full-resolution patch in voxels, 'x,y,z' (default: the median atrium box plus margins, at most 64^3 voxels)."),
    margin_mm: float = typer.Option(_PLAN.crop_margin_mm, help="Margin around the localiser's box that the full-resolution stage sees."),
    crop_context: str = typer.Option(_PLAN.crop_context, help="What fills the full-resolution stage's crop up to its patch where the box and margin are smaller: 'pad' (the volume's minimum) or 'scan' (the scan around the box, as training patches see it; the mask stays inside the box)."),
    foreground_fraction: float = typer.Option(_FINE.foreground_fraction, help="Share of patches centred on a foreground voxel."),
    soft_labels: bool = typer.Option(_FINE.soft_labels, "--soft-labels/--hard-labels", help="Train every stage on the share of each of its voxels that the label covers (a finer edge once the probabilities are resampled to the scan's grid) instead of that share rounded at 0.5."),
    flip_prob: float = typer.Option(_AUGMENT.p_flip, help="Probability of mirroring each axis of a training patch (orientation robustness; with --permute-prob 0, 0 trains the stored orientation only)."),
    permute_prob: float = typer.Option(_AUGMENT.p_permute, help="Probability of permuting the axes of a training patch."),
    dark_pool_prob: float = typer.Option(_AUGMENT.p_dark_pool, help="Probability of darkening the atrium's interior in a training patch, its edge little and the outside not at all (a blood pool darker than the wall around it, as in LGE scans whose contrast has washed out)."),
    fov_cut_prob: float = typer.Option(_AUGMENT.p_fov_cut, help="Probability of ending a training patch's field of view at a random plane through the atrium (padding and no label beyond it, as past a scan's edge), so that a scan whose edge cuts the atrium is segmented up to that edge."),
    thick_slice_prob: float = typer.Option(_AUGMENT.p_thick_slice, help="Probability of making a training patch look like a scan of thicker slices along one random axis (slab means, interpolated back), so that scans with 2-3 mm slices are trained on; the thickest slice counts as a trained voxel size in QC's range."),
    thick_slice_mm: str = typer.Option(",".join(f"{v:g}" for v in _AUGMENT.thick_slice_mm), help="Range of those slices' thickness in mm, 'low,high'."),
    invert_prob: float = typer.Option(_AUGMENT.p_invert, help="Probability of negating a training patch's intensities (air and blood pool swap brightness), so that a blood pool darker than the atrial wall, as in some LGE scans, is seen in training."),
    dataset_weight: Optional[List[str]] = typer.Option(None, "--dataset-weight", metavar="NAME=W", help="Draw training patches from dataset NAME (its folder's name) W times as often as from a dataset given no weight (default: every dataset equally often). Repeat it for several."),
    device: str = typer.Option(_FINE.device, help="auto (CUDA when available), cpu or cuda."),
    threads: Optional[int] = typer.Option(None, help="PyTorch CPU threads (default: all cores)."),
    workers: int = typer.Option(_FINE.workers, help="Processes that draw and augment training patches (0: one background thread). On a GPU, give several: one CPU thread cannot keep up. Repeatable for a given number, but other patches than with another."),
    cache: Optional[str] = typer.Option(None, help="Folder for preprocessed volumes (default $HEARTSEG_CACHE or ~/.cache/heartseg; 'none' disables)."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="Use the folds of this file (the format of a run's splits.json) instead of making them: a fixed split, or a subset of the cases (cases no fold names are not used)."),
    init_from: Optional[List[Path]] = typer.Option(None, "--init-from", metavar="MODEL.pt", help="Start from existing weights (fine-tuning): a heartseg model.pt or an exported model file such as models/heartseg-la.onnx (every stage; its weights are read back and checked against ONNX Runtime), or one stage's RUN/fold_K/STAGE/best.pt or last.pt (that stage only, read inside its run folder: its best validation or its latest step, e.g. the networks of a run whose threshold calibration failed); the networks must match this run's presets, except that a larger --width grows the full-resolution network (each new channel a copy of a trained one: it starts computing the same function). Given again, a later source replaces the stages it holds (e.g. a model.pt, then another run's coarse/best.pt)."),
    ensemble_of: Optional[List[Path]] = typer.Option(None, "--ensemble-of", metavar="MODEL.pt", help="No training: average the probabilities of these models (repeat it; fold models of one plan) into -o RUN/model.pt, its thresholds and QC calibrations fitted on the cases of DATA that neither they nor the weights they started from trained on, and none of them validated on (e.g. fold 0's held-out cases, for members trained on sub-folds of fold 0's training cases)."),
    average_weights: Optional[List[Path]] = typer.Option(None, "--average-weights", metavar="MODEL.pt", help="No training: average the weights of these models (repeat it; models fine-tuned from one model on the same fold, e.g. with other augmentation or seeds) into one network per stage, as fast as one of them, in -o RUN/model.pt, its thresholds and QC calibrations fitted on the fold's held-out cases as a training run fits them. Each stage's networks must have started from the same weights (--init-from); a BatchNorm stage must be the same in every member."),
    version: bool = version_option(),
) -> None:
    """Train, calibrate the threshold on held-out cases, and write RUN/model.pt.

    Exit codes: 0 done, 1 training failed (e.g. no threshold gives a usable mask), 2 bad input.
    """
    from rich.console import Console

    console = Console(stderr=True, markup=False, highlight=False)
    try:
        import torch
    except ImportError:
        console.print("error: heartseg-train needs PyTorch: pip install 'heartseg[train]'")
        raise typer.Exit(2)
    from heartseg.train.pipeline import Run, RunConfig
    from heartseg.train.plan import STAGE_KINDS, PlanOptions
    from heartseg.train.unet import PRESETS

    try:
        distributed = _init_distributed(torch)
        if recalibrate and resume is None:
            raise HeartsegError("--recalibrate goes with --resume RUN_FOLDER")
        if device not in ("auto", "cpu", "cuda"):
            raise HeartsegError(f"--device {device!r}: choose auto, cpu or cuda")
        if ensemble_of and average_weights:
            raise HeartsegError("--ensemble-of and --average-weights combine models in two ways: choose one")
        if ensemble_of or average_weights:
            option = "--ensemble-of" if ensemble_of else "--average-weights"
            if distributed:
                raise HeartsegError(f"{option} trains nothing: run it without torchrun")
            _combine(ctx, option, data, output, ensemble_of or average_weights, cache, device, threads, console,
                     torch)
            return
        if resume is not None:
            if not (resume / "config.json").is_file():
                raise HeartsegError(f"{resume}: no config.json, not a heartseg-train run folder")
            config = RunConfig.load(resume / "config.json")
            config.output = str(resume)  # the folder may have moved since it was created
            if fold is not None:
                config.fold = fold
                if not distributed or torch.distributed.get_rank() == 0:
                    config.save(resume / "config.json")
            console.print(f"resuming {resume} (folds: {config.fold})")
        else:
            if not data or output is None:
                raise HeartsegError("give a dataset folder and -o RUN_FOLDER (or --resume RUN_FOLDER)")
            if splits is not None and not splits.is_file():
                raise HeartsegError(f"--splits {splits}: no such file")
            for source in init_from or []:
                if not source.is_file():
                    raise HeartsegError(f"--init-from {source}: no such file")
            if stage not in STAGE_KINDS:
                raise HeartsegError(f"--stage {stage!r}: choose cascade, single, coarse or fine")
            if preset not in PRESETS:
                raise HeartsegError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
            if output.exists() and (output / "config.json").exists():
                raise HeartsegError(f"{output}: a run already exists there (use --resume {output} or a new folder)")
            unet = PRESETS[preset]
            try:
                unet = replace(unet, base_channels=unet.base_channels if width is None else width,
                               norm=norm or unet.norm)
            except ValueError as exc:
                raise HeartsegError(f"network options: {exc}") from None
            patch_size = _triple(patch, int)
            if patch_size and any(p % 2**unet.depth for p in patch_size):
                raise HeartsegError(f"--patch {patch}: every size must be a multiple of {2**unet.depth} "
                                    f"(the network pools {unet.depth} times)")
            weights = _weights(dataset_weight)
            config = _new_config(data, output, stage, fold, folds, seed, unet, cache, threads, init_from, splits,
                                 dict(p_flip=flip_prob, p_permute=permute_prob, p_invert=invert_prob,
                                      p_dark_pool=dark_pool_prob, p_fov_cut=fov_cut_prob,
                                      p_thick_slice=thick_slice_prob,
                                      thick_slice_mm=_pair(thick_slice_mm, "--thick-slice-mm")),
                                 dict(fine_spacing=_triple(fine_spacing), coarse_spacing=coarse_spacing,
                                      fine_patch=patch_size, crop_margin_mm=margin_mm,
                                      crop_context=crop_context),
                                 dict(steps=steps, batch_size=batch_size, lr=lr, val_every=val_every,
                                      checkpoint_every=checkpoint_every, seed=seed, device=device,
                                      foreground_fraction=foreground_fraction, workers=workers,
                                      dataset_weights=weights, soft_labels=soft_labels),
                                 dict(steps=coarse_steps, batch_size=batch_size, val_every=val_every,
                                      checkpoint_every=checkpoint_every, seed=seed, device=device, workers=workers,
                                      dataset_weights=dict(weights), soft_labels=soft_labels))
        if config.threads:
            torch.set_num_threads(config.threads)
        run = Run(config, log=console.log, progress_factory=_progress_factory(console), recalibrate=recalibrate)
        run.check_init()  # weights that do not fit, or a 0-step stage without any, before any work starts
        rank = torch.distributed.get_rank() if distributed else 0
        if distributed:
            # Every rank has checked that the run folder is new before rank 0 writes config.json into it.
            torch.distributed.barrier()
        created = not Path(config.output).exists()
        Path(config.output).mkdir(parents=True, exist_ok=True)
        if resume is None and rank == 0:
            config.save(Path(config.output) / "config.json")
        try:
            summary = run.run()
        except BaseException:
            if resume is None and rank == 0:
                _remove_unstarted_run(Path(config.output), created)
            raise
        if summary is not None:
            console.print(f"held-out mean Dice {summary['mean']['dice']:.4f} over {summary['cases']} cases "
                          f"(folds {summary['folds']}); model: {Path(config.output) / 'model.pt'}")
        if distributed:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    except HeartsegError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)


# What --ensemble-of and --average-weights use; every other option is about training and is refused beside them.
_COMBINE_OPTIONS = ("data", "output", "ensemble_of", "average_weights", "cache", "device", "threads", "version")


def _combine(ctx: typer.Context, option: str, data, output, members, cache, device, threads, console, torch) -> None:
    """heartseg-train DATA... -o OUT --ensemble-of M1 --ensemble-of M2 ... (or --average-weights): build, calibrate
    and score one model from several."""
    from heartseg.train.ensemble import build_ensemble
    from heartseg.train.trainer import pick_device
    from heartseg.train.weight_average import build_weight_average

    # By name: typer may carry its own copy of click's ParameterSource.
    given = [name for name in ctx.params if name not in _COMBINE_OPTIONS
             and getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"]
    if given:
        raise HeartsegError(f"{option} trains nothing: {', '.join('--' + n.replace('_', '-') for n in given)} "
                            "does not apply to it")
    if not data or output is None:
        raise HeartsegError(f"{option} needs the dataset folders and -o OUT_FOLDER")
    for member in members:
        if not member.is_file():
            raise HeartsegError(f"{option} {member}: no such file")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise HeartsegError(f"{output}: exists and is not an empty folder; choose a new -o folder")
    if threads:
        torch.set_num_threads(threads)
    command = " ".join(shlex.quote(a) for a in ["heartseg-train", *sys.argv[1:]])
    build = build_ensemble if option == "--ensemble-of" else build_weight_average
    build(list(data), list(members), output, cache, pick_device(device).type, log=console.log, command=command)


def _new_config(data, output, stage, fold, folds, seed, unet, cache, threads, init_from, splits, augment: dict,
                plan: dict, fine: dict, coarse: dict):
    """A new run's configuration; a value no run can use is named by its command-line option."""
    from heartseg.train.pipeline import RunConfig

    try:
        plan_options = PlanOptions(**plan)
    except ConfigError as exc:
        raise exc.as_option() from None
    try:
        fine_config = replace(_FINE, **fine)
    except ConfigError as exc:
        raise exc.as_option() from None
    try:
        coarse_config = replace(_COARSE, **coarse)
    except ConfigError as exc:
        raise exc.as_option("coarse-" if exc.field == "steps" else "") from None
    try:
        augment_config = replace(_AUGMENT, **augment)
    except ConfigError as exc:
        raise exc.as_option() from None
    try:
        return RunConfig(data=[str(d.resolve()) for d in data], output=str(output.resolve()), kind=stage,
                         fold=fold or "0", n_folds=folds, seed=seed, fine_unet=unet, cache=cache, threads=threads,
                         init_from=[str(source.resolve()) for source in init_from or []],
                         splits=str(splits.resolve()) if splits else None,
                         command=" ".join(shlex.quote(a) for a in ["heartseg-train", *sys.argv[1:]]),
                         plan=plan_options, fine=fine_config, coarse=coarse_config, augment=augment_config)
    except ConfigError as exc:
        raise exc.as_option() from None


# What a run leaves that is worth keeping: a checkpoint to resume from, or a model.
_KEEP = ("last.pt", "best.pt", "model.pt")


def _remove_unstarted_run(folder: Path, created: bool) -> None:
    """Remove what a run that failed before its first checkpoint wrote, so that it can simply be run again."""
    import shutil

    if any(any(folder.rglob(name)) for name in _KEEP):
        return
    if created:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in ("config.json", "plan.json", "splits.json"):
        (folder / name).unlink(missing_ok=True)
    for sub in folder.glob("fold_*"):
        shutil.rmtree(sub, ignore_errors=True)


def _init_distributed(torch) -> bool:
    """Join the process group when launched by torchrun with more than one process; True under DDP."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not torch.distributed.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            torch.distributed.init_process_group(backend)
        return True
    return False


def main() -> None:
    """Console entry point."""
    app(prog_name="heartseg-train")


if __name__ == "__main__":
    main()
