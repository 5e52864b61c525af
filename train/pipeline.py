"""A training run: plan, splits, cached preprocessing, stages, calibration, held-out metrics, model.pt."""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from heartseg.runtime.atomic import atomic_output, write_text_atomic
from heartseg.runtime.qc import CALIBRATED_SCORES, pooled_score_calibration
from heartseg.runtime.contract import FORMAT_VERSION, LOCALISER, SEGMENTER, ModelContract, StageContract
from heartseg.runtime.errors import HeartsegError

from .augment import AugmentConfig
from .cache import PreparedCase, cache_root, fingerprint, prepare_case
from .calibrate import CalibrationError
from .checkpoint import is_stage_checkpoint, model_checkpoint, read_stage_weights, save_atomic
from .dataset import DatasetInfo, dataset_info, image_hash, read_datasets
from .evaluate import (
    calibrate_and_evaluate,
    learned_plausibility,
    stage_network,
    summarize_by_dataset,
    summarize_dicts,
)
from .lineage import Lineage, trained_cases
from .model_files import read_model
from .onnx_import import folded_batchnorm
from .options import FOLDS, SEED, STAGE_KIND, ConfigError, integer_at_least, one_of
from .plan import STAGE_KINDS, PlanOptions, TrainPlan, fingerprint_dict, plan_stages
from .splits import Fold, given_folds, make_folds, read_splits, write_splits
from .options import COARSE_TRAIN
from .trainer import StageOutcome, TrainConfig, _rank, pick_device, train_stage
from .unet import PRESETS, UNetConfig
from .widen import can_widen, widen_state_dict


@dataclass
class RunConfig:
    """Everything a run needs; saved as config.json so that --resume continues it unchanged."""

    data: list[str]
    output: str
    kind: str = STAGE_KIND
    fold: str = "0"
    n_folds: int = FOLDS
    seed: int = SEED
    fine: TrainConfig = field(default_factory=TrainConfig)
    coarse: TrainConfig = field(default_factory=lambda: TrainConfig(**COARSE_TRAIN))
    fine_unet: UNetConfig = field(default_factory=lambda: PRESETS["fine"])
    coarse_unet: UNetConfig = field(default_factory=lambda: PRESETS["coarse"])
    plan: PlanOptions = field(default_factory=PlanOptions)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache: str | None = None
    threads: int | None = None
    init_from: list[str] = field(default_factory=list)
    splits: str | None = None
    command: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.data, list) or not self.data or not all(isinstance(d, str) for d in self.data):
            raise ConfigError("data", self.data, "give one or more dataset folders")
        one_of(self.kind, STAGE_KINDS, "kind")
        integer_at_least(self.n_folds, 2, "n_folds")
        integer_at_least(self.seed, 0, "seed")
        if self.threads is not None:
            integer_at_least(self.threads, 1, "threads")
        if not isinstance(self.init_from, list) or not all(isinstance(p, str) for p in self.init_from):
            raise ConfigError("init_from", self.init_from, "give a list of checkpoint paths")
        for name, kind in (("fine", TrainConfig), ("coarse", TrainConfig), ("fine_unet", UNetConfig),
                           ("coarse_unet", UNetConfig), ("plan", PlanOptions), ("augment", AugmentConfig)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(name, getattr(self, name), f"must be a {kind.__name__}")

    def save(self, path: Path) -> None:
        """Write config.json."""
        write_text_atomic(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        """Read config.json; HeartsegError naming the file when it is not a usable run configuration."""
        try:
            data = json.loads(Path(path).read_text())
            if isinstance(data["data"], str):
                data["data"] = [data["data"]]
            # Runs of earlier releases name one --init-from source, or none.
            if not isinstance(data.get("init_from", []), list):
                data["init_from"] = [data["init_from"]] if data["init_from"] else []
            return cls(**{**data, "fine": TrainConfig(**data["fine"]), "coarse": TrainConfig(**data["coarse"]),
                          "fine_unet": UNetConfig.from_dict(data["fine_unet"]),
                          "coarse_unet": UNetConfig.from_dict(data["coarse_unet"]),
                          "plan": PlanOptions(**{k: tuple(v) if isinstance(v, list) else v
                                                 for k, v in data["plan"].items()}),
                          "augment": AugmentConfig(**data["augment"])})
        except HeartsegError as exc:
            raise HeartsegError(f"{path}: {exc}") from None
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise HeartsegError(f"{path}: not a usable heartseg-train configuration "
                                f"({type(exc).__name__}: {str(exc)[:200]})") from None


def versions() -> dict[str, str]:
    """Software versions recorded in every model."""
    import nibabel
    import scipy
    from heartseg.runtime import __version__

    return {"heartseg": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
            "numpy": np.__version__, "scipy": scipy.__version__, "nibabel": nibabel.__version__}


def _stage_configs(config: RunConfig, role: str) -> tuple[TrainConfig, UNetConfig]:
    if role == LOCALISER:
        return config.coarse, config.coarse_unet
    return config.fine, config.fine_unet


# Each stage's (role, network, weights, the stage's contract in its source).
InitWeights = dict[str, tuple[str, UNetConfig, dict, StageContract]]


def _model_weights(path: Path) -> InitWeights:
    """Every stage's (role, network, weights, stage contract) from a model.pt or an exported model file."""
    source = read_model(path)
    weights = {}
    for stage in source.contract.stages:
        members = source.networks[stage.name]
        if len(members) > 1:
            raise HeartsegError(f"{path}: an ensemble of {len(members)} networks cannot start a training "
                                "(give one of its members' model.pt)")
        weights[stage.name] = (stage.role, members[0].unet, members[0].state_dict, stage)
    return weights


def _stage_weights(path: Path) -> InitWeights:
    """One stage's (role, network, weights, stage contract) from RUN/fold_K/STAGE/best.pt (or last.pt); its run's
    config.json and plan.json say which network it is."""
    path = path.resolve()
    run = path.parents[2] if len(path.parents) > 2 else path.parent
    if not ((run / "config.json").is_file() and (run / "plan.json").is_file()):
        raise HeartsegError(f"{path}: a {path.name} is read inside its run folder (RUN/fold_K/STAGE/{path.name}, "
                            f"with RUN/config.json and RUN/plan.json)")
    config = RunConfig.load(run / "config.json")
    try:
        contract = ModelContract.from_dict(json.loads((run / "plan.json").read_text())["contract"])
    except (HeartsegError, ValueError, KeyError, TypeError) as exc:
        raise HeartsegError(f"{run / 'plan.json'}: not a heartseg plan ({exc})") from None
    stage = next((s for s in contract.stages if s.name == path.parent.name), None)
    if stage is None:
        raise HeartsegError(f"{path}: its run has no stage {path.parent.name!r}")
    return {stage.name: (stage.role, _stage_configs(config, stage.role)[1], read_stage_weights(path), stage)}


def _grid(stage: StageContract, patch: bool) -> str:
    """A stage's spacing, margin and, for one that trains, its patch, as words."""
    spacing = ",".join(f"{v:g}" for v in stage.spacing)
    size = f", patch {'x'.join(str(v) for v in stage.patch_size)}" if patch else ""
    return f"{spacing} mm{size}, margin {stage.crop_margin_mm:g} mm, {stage.context} context"


class Run:
    """One heartseg-train run directory."""

    def __init__(self, config: RunConfig, log=print, progress_factory=None, recalibrate: bool = False) -> None:
        self.config = config
        # recalibrate: finished folds are not kept as they are: their trained networks are calibrated and
        # evaluated again by this heartseg's inference, and their model.pt written anew.
        self.recalibrate = recalibrate
        self.dir = Path(config.output)
        self.log = log
        self.progress_factory = progress_factory
        self.datasets: list[DatasetInfo] = read_datasets(config.data)
        self.cases = [case for info in self.datasets for case in info.cases]
        names = sorted({case.dataset for case in self.cases})
        for unknown in sorted(set(config.fine.dataset_weights) | set(config.coarse.dataset_weights)):
            if unknown not in names:
                raise HeartsegError(f"--dataset-weight {unknown}: no such dataset among {', '.join(names)}")

    def prepare(self) -> tuple[TrainPlan, list[Fold]]:
        """Write (or reread) plan.json and splits.json (under DDP, rank 0 writes them and the others read them)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        plan_path, splits_path = self.dir / "plan.json", self.dir / "splits.json"
        rank, world = _rank()
        if world > 1:
            if rank == 0:
                self._prepare(plan_path, splits_path)
            torch.distributed.barrier()
            return TrainPlan.load(plan_path), read_splits(splits_path)
        return self._prepare(plan_path, splits_path)

    def _prepare(self, plan_path: Path, splits_path: Path) -> tuple[TrainPlan, list[Fold]]:
        if plan_path.exists() and splits_path.exists():
            return TrainPlan.load(plan_path), read_splits(splits_path)
        fp = fingerprint(self.cases)
        reasons: dict[str, str] = {}
        contract = ModelContract(stages=plan_stages(self.config.kind, fp, self.config.plan, reasons),
                                 bytes_per_voxel=self.config.fine_unet.base_channels * 4 * 10)
        plan = TrainPlan(self.config.kind, contract, ",".join(str(info.root) for info in self.datasets),
                         fingerprint_dict(fp), reasons)
        hashes = {c.case_id: image_hash(c.image) for c in self.cases}
        if self.config.splits:
            folds = given_folds(Path(self.config.splits), hashes)
        else:
            folds = make_folds([c.case_id for c in self.cases], hashes, self.config.n_folds, self.config.seed,
                               strata={c.case_id: c.dataset for c in self.cases})
        plan.save(plan_path)
        write_splits(splits_path, folds, self.config.seed)
        return plan, folds

    def load_cases(self, contract: ModelContract, ids: list[str]) -> list[PreparedCase]:
        """Preprocess (or read from the cache) the given cases."""
        by_id = {c.case_id: c for c in self.cases}
        root = cache_root(self.config.cache)
        return [prepare_case(by_id[i], contract, root) for i in ids]

    def folds_to_run(self, folds: list[Fold]) -> list[Fold]:
        """The folds selected by --fold ('all', one index, or a comma-separated list)."""
        if self.config.fold == "all":
            return folds
        try:
            indices = [int(part) for part in str(self.config.fold).split(",") if part.strip()]
        except ValueError:
            raise HeartsegError(f"--fold {self.config.fold!r}: give a fold number, a list like 1,2 or 'all'") from None
        for index in indices:
            if not 0 <= index < len(folds):
                raise HeartsegError(f"--fold {index}: there are {len(folds)} folds (0..{len(folds) - 1})")
        return [folds[i] for i in indices]

    def run(self) -> dict | None:
        """Train every selected fold; returns the summary over folds (None on DDP ranks other than 0)."""
        plan, folds = self.prepare()
        results = {}
        for fold in self.folds_to_run(folds):
            results[fold.index] = self.run_fold(plan, fold)
        if _rank()[0] != 0:
            return None  # under DDP only rank 0 calibrates, evaluates and writes the model
        summary = self.summarize(results)
        first = self.dir / f"fold_{self.folds_to_run(folds)[0].index}" / "model.pt"
        with atomic_output(self.dir / "model.pt") as tmp:
            shutil.copyfile(first, tmp)
        return summary

    def run_fold(self, plan: TrainPlan, fold: Fold) -> dict:
        """Train, calibrate and evaluate one fold; writes fold_k/model.pt and metrics.json."""
        from .report import save_reports

        fold_dir = self.dir / f"fold_{fold.index}"
        if (fold_dir / "model.pt").is_file() and (fold_dir / "metrics.json").is_file():
            if not self.recalibrate:
                self.log(f"fold {fold.index}: already complete, kept as it is")
                return json.loads((fold_dir / "metrics.json").read_text())
            self.log(f"fold {fold.index}: calibrating and evaluating its trained networks again")
        fold_dir.mkdir(parents=True, exist_ok=True)
        self.log(f"fold {fold.index}: training on {len(fold.train)} cases, validating on {len(fold.val)} "
                 f"({_count_by_dataset(self.cases, fold.val)})")
        train_cases = self.load_cases(plan.contract, fold.train)
        val_cases = self.load_cases(plan.contract, fold.val)
        # What a plausible atrium is comes from this fold's training labels only.
        plausibility = learned_plausibility(train_cases, self.config.augment)
        # Ranges learned by this code are of this code's format, whatever the plan was written with.
        contract = replace(plan.contract, plausibility=plausibility, format_version=FORMAT_VERSION)
        init = self.init_weights(contract)
        seen = self.init_lineage()
        # Held-out means never trained on, by this run or by the weights it started from.
        overlap = sorted(seen.trained & set(fold.val))
        if overlap:
            self.log(f"warning: fold {fold.index}: the --init-from weights were trained on {len(overlap)} of its "
                     f"held-out cases ({', '.join(overlap[:5])}{', ...' if len(overlap) > 5 else ''}): its "
                     "held-out metrics overstate the model")
        if seen.untraced:
            self.log(f"warning: fold {fold.index}: cannot tell which cases these --init-from weights were trained "
                     f"on (unreadable): {', '.join(seen.untraced)}")
        rank = _rank()[0]
        writer = _tensorboard(fold_dir / "tb") if rank == 0 else None
        outcomes: dict[str, StageOutcome] = {}
        for stage in contract.stages:
            train_config, unet_config = _stage_configs(self.config, stage.role)
            progress = self.progress_factory(f"fold {fold.index} {stage.name}", train_config.steps) if self.progress_factory else None
            outcomes[stage.name] = train_stage(fold_dir / stage.name, stage, contract, unet_config, train_cases,
                                               val_cases, train_config, self.config.augment, progress, writer,
                                               init_state=init.get(stage.name),
                                               log=lambda text, k=fold.index: self.log(f"fold {k} {text}"))
            o = outcomes[stage.name]
            if o.steps == 0:
                self.log(f"fold {fold.index} {stage.name}: kept its --init-from weights (0 steps); validation Dice "
                         f"{o.best_dice:.4f}")
            else:
                self.log(f"fold {fold.index} {stage.name}: best validation Dice {o.best_dice:.4f} at step "
                         f"{o.best_step}; {o.seconds_per_step:.2f} s/step over {o.steps} steps")
        if rank != 0:
            return {}
        networks = {name: stage_network([(o.unet, o.state_dict)]) for name, o in outcomes.items()}
        try:
            evaluation = calibrate_and_evaluate(contract, networks, pick_device(self.config.fine.device), val_cases,
                                                plausibility)
        except CalibrationError as exc:
            raise exc.with_advice(_calibration_advice(contract, fold_dir, exc.stage)) from None
        contract = evaluation.contract
        metrics = {
            "fold": fold.index, "train_cases": fold.train, "val_cases": fold.val,
            "split": "held-out validation cases of this fold (never trained on)" if not overlap else
                     f"held-out validation cases of this fold, {len(overlap)} of them trained on by the --init-from "
                     "weights",
            "init_trained_on_held_out": overlap, "init_untraced": seen.untraced,
            **evaluation.metrics(),
            "stages": {n: {k: v for k, v in asdict(o).items() if k not in ("state_dict", "history")}
                       for n, o in outcomes.items()},
        }
        write_text_atomic(fold_dir / "metrics.json", json.dumps(metrics, indent=1))
        contract = replace(contract, info={
            **dataset_info(self.datasets),
            "fold": str(fold.index), "train_cases": ",".join(fold.train), "val_cases": ",".join(fold.val),
            "init_from": " + ".join(self.config.init_from),
        })
        checkpoint = model_checkpoint(contract, {n: [(o.unet, o.state_dict)] for n, o in outcomes.items()},
                                      kind=plan.kind, metrics=json.loads(json.dumps(metrics)), versions=versions(),
                                      command=self.config.command)
        save_atomic(checkpoint, fold_dir / "model.pt")
        save_reports(fold_dir, outcomes, evaluation.calibrations, val_cases, evaluation.probs, contract)
        if writer:
            writer.close()
        self.log(f"fold {fold.index}: {evaluation.summary_line()}; wrote {fold_dir / 'model.pt'}")
        return metrics

    def init_weights(self, contract: ModelContract) -> dict[str, dict]:
        """Per-stage weights of the --init-from sources (empty without one), a later source replacing the
        stages it holds: each a model.pt or exported file (every stage) or one stage's best.pt or last.pt. Warns
        where a stage starts from weights made for another grid than this run's plan (the patch only if it trains)."""
        sources = self._init_sources
        planned = {stage.name: stage for stage in contract.stages}
        for name, (role, unet, state, theirs) in sources.items():
            if name not in planned:
                continue  # a stage this run does not have (--stage fine or coarse)
            ours, trains = planned[name], _stage_configs(self.config, role)[0].steps > 0
            if _grid(theirs, trains) != _grid(ours, trains):
                self.log(f"warning: stage {name!r} starts from weights made for {_grid(theirs, trains)}, this run "
                         f"plans {_grid(ours, trains)}: give theirs (--fine-spacing, --coarse-spacing, --patch, "
                         "--margin-mm, --crop-context) to keep the grid they were trained on")
            if trains and unet.norm == "batch" and folded_batchnorm(state):
                self.log(f"warning: stage {name!r} starts from weights read back from an exported file, whose "
                         "BatchNorm export folded into the convolutions: training it normalises by batch "
                         "statistics from its first step (keep it as it is with --coarse-steps 0)")
        return {name: state for name, (_, _, state, _) in sources.items()}

    @cached_property
    def _init_sources(self) -> InitWeights:
        # Read once per run: checked before any work, then used by every fold (an exported file's read-back
        # includes its parity check against ONNX Runtime). load_state_dict copies, so folds share them safely.
        weights: InitWeights = {}
        for source in self.config.init_from:
            path = Path(source)
            found = _stage_weights(path) if is_stage_checkpoint(path) else _model_weights(path)
            for name, (role, theirs, state, stage) in found.items():
                train, ours = _stage_configs(self.config, role)
                if role == SEGMENTER and can_widen(theirs, ours):  # --width sets the segmenter's network only
                    try:
                        grown = widen_state_dict(state, theirs, ours)
                    except ValueError as exc:
                        raise HeartsegError(f"{source}: {exc}") from None
                    untrained = "" if train.steps else " (kept untrained with 0 steps: the same model, only slower)"
                    self.log(f"stage {name!r}: grown from {theirs.channels()} to {ours.channels()} channels per "
                             f"level, computing the same function as its --init-from weights{untrained}")
                    state, theirs = grown, ours
                if theirs != ours:
                    hint = "; only its channels may grow (--width)" if role == SEGMENTER else ""
                    raise HeartsegError(f"{source}: its {name!r} network is not the one this run trains "
                                        f"({theirs.to_dict()} vs {ours.to_dict()}){hint}")
                weights[name] = (role, theirs, state, stage)
        return weights

    def init_lineage(self) -> Lineage:
        """The cases the --init-from weights and their own starting weights were trained on."""
        lineage = Lineage()
        for source in self.config.init_from:
            trained_cases(source, lineage)
        return lineage

    def check_init(self) -> None:
        """Refuse, before any work, --init-from weights that do not fit and a stage given 0 steps without any."""
        roles = {role for role, _, _, _ in self._init_sources.values()}
        wanted = []
        if self.config.kind in ("cascade", "coarse") and self.config.coarse.steps == 0:
            wanted.append((LOCALISER, "--coarse-steps 0", "localiser"))
        if self.config.kind != "coarse" and self.config.fine.steps == 0:
            wanted.append((SEGMENTER, "--steps 0", "full-resolution network"))
        for role, option, what in wanted:
            if role not in roles:
                raise HeartsegError(f"{option} keeps the {what}'s --init-from weights untrained, but no --init-from "
                                    "source holds them")

    def summarize(self, results: dict[int, dict]) -> dict:
        """Write summary.json over the folds that were run."""
        per_case = {cid: m for r in results.values() for cid, m in r["per_case"].items()}
        summary = {"folds": sorted(results), "cases": len(per_case),
                   "mean": summarize_dicts(per_case),
                   "per_dataset": summarize_by_dataset(per_case),
                   "per_fold": {k: v["mean"] for k, v in results.items()},
                   "split": "each case scored by the fold that held it out"}
        # QC's score calibrations refitted on every held-out case (heartseg-export --score-calibration); one
        # that a fold calibrated by an older release lacks is left out rather than fitted on the other folds.
        for name, (score, dice) in CALIBRATED_SCORES.items():
            if all(m.get(score) is not None for m in per_case.values()):
                if (pooled := pooled_score_calibration(per_case, score, dice)) is not None:
                    summary[name] = pooled.to_dict()
            else:
                self.log(f"summary.json: no pooled {name} (some folds were calibrated before it existed: "
                         f"heartseg-train --resume {self.dir} --recalibrate)")
        write_text_atomic(self.dir / "summary.json", json.dumps(summary, indent=1))
        return summary


def _calibration_advice(contract: ModelContract, fold_dir: Path, failed: str | None) -> str:
    """What a run whose threshold calibration failed leaves, and how to train its networks longer from there."""
    role = next((s.role for s in contract.stages if s.name == failed), SEGMENTER)
    option = "--coarse-steps" if role == LOCALISER else "--steps"
    sources = " ".join(f"--init-from {fold_dir / s.name / 'best.pt'}" for s in contract.stages)
    return (f"the model was not written, the trained networks are kept: train them longer (more {option}) by running "
            f"the same command with a new -o folder and {sources} (the networks calibrated, at their best validation; "
            "each stage's last.pt, its latest step, serves too); or check the labels")


def _count_by_dataset(cases, ids: list[str]) -> str:
    wanted = set(ids)
    names = [c.dataset for c in cases if c.case_id in wanted]
    return ", ".join(f"{name} {names.count(name)}" for name in sorted(set(names)))


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return None
    return SummaryWriter(str(path))
