"""Pictures of a fold: training curves, the threshold sweep, and overlays on held-out cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from heartseg.runtime.contract import ModelContract
from heartseg.runtime.postprocess import mask_from_prob
from heartseg.runtime.overlay import require_pyplot, save_overlay

from .cache import PreparedCase
from .calibrate import Calibration
from .trainer import StageOutcome


def save_curves(path: Path, outcomes: dict[str, StageOutcome]) -> None:
    """Loss and validation Dice against step, one column per stage."""
    plt = require_pyplot()
    fig, axes = plt.subplots(2, len(outcomes), figsize=(5 * len(outcomes), 6), squeeze=False)
    for col, (name, outcome) in enumerate(outcomes.items()):
        loss = np.asarray(outcome.history["loss"])
        axes[0, col].plot(np.arange(1, len(loss) + 1), loss, lw=0.5, alpha=0.4)
        if len(loss) >= 20:
            smooth = np.convolve(loss, np.ones(20) / 20, mode="valid")
            axes[0, col].plot(np.arange(20, len(loss) + 1), smooth, lw=1.5)
        axes[0, col].set(title=f"{name}: training loss", xlabel="step")
        val = np.asarray(outcome.history["val"]).reshape(-1, 2)
        axes[1, col].plot(val[:, 0], val[:, 1], "o-")
        axes[1, col].set(title=f"{name}: validation (threshold 0.5)", xlabel="step", ylabel="Dice", ylim=(0, 1))
        hd95 = np.asarray(outcome.history.get("val_hd95", []), float).reshape(-1, 2)
        if len(hd95):
            twin = axes[1, col].twinx()
            twin.plot(hd95[:, 0], hd95[:, 1], "s--", color="tab:red", alpha=0.7)
            twin.set_ylabel("HD95 mm", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_calibration(path: Path, calibrations: dict[str, Calibration]) -> None:
    """Mean held-out Dice against threshold, the chosen one marked, degenerate thresholds greyed."""
    plt = require_pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, cal in calibrations.items():
        t, d = np.asarray(cal.thresholds), np.asarray(cal.mean_dice)
        ax.plot(t, d, "o-", label=f"{name} (chosen {cal.threshold:.2f}: Dice {cal.dice:.3f})")
        bad = np.asarray(cal.degenerate)
        if bad.any():
            ax.plot(t[bad], d[bad], "x", color="grey")
    ax.set(xlabel="threshold", ylabel="mean Dice on held-out cases", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_reports(fold_dir: Path, outcomes: dict[str, StageOutcome], calibrations: dict[str, Calibration],
                 val_cases: list[PreparedCase], probs: list[np.ndarray], contract: ModelContract) -> None:
    """All of a fold's pictures."""
    save_curves(fold_dir / "curves.png", outcomes)
    save_calibration(fold_dir / "calibration.png", calibrations)
    for case, prob in list(zip(val_cases, probs))[:3]:
        save_overlay(fold_dir / f"overlay_{case.case_id}.png", np.asarray(case.image), mask_from_prob(prob, contract),
                       np.asarray(case.label), f"{case.case_id} (held out)")
