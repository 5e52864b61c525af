"""Seconds per training step of the fine U-Net on CPU, as heartseg-train runs it.

One step: forward on 2 patches of 64^3 (tiny mode 16^3) in channels_last_3d, the Dice + BCE loss,
backward and an AdamW update, with 2 intra-op threads. It tells how long CPU training would take.
"""

from __future__ import annotations

import benchlib
import pytest

pytestmark = pytest.mark.benchmark_suite

THREADS = 2
BATCH = 2


def test_training_step(benchmark) -> None:
    """Median seconds of one optimisation step."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'heartseg[train]')")
    from heartseg.train.losses import DiceBCELoss
    from heartseg.train.unet import PRESETS, build_unet, count_flops_per_voxel

    benchmark.group = "training step"
    size = 16 if benchlib.TINY else 64
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        torch.manual_seed(0)
        model = build_unet(PRESETS["fine"]).to(memory_format=torch.channels_last_3d).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-5)
        loss_fn = DiceBCELoss()
        images = torch.randn(BATCH, 1, size, size, size).contiguous(memory_format=torch.channels_last_3d)
        labels = (torch.rand(BATCH, 1, size, size, size) > 0.8).float().contiguous(
            memory_format=torch.channels_last_3d)

        def step() -> float:
            loss = loss_fn(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return float(loss.detach())

        seconds, _ = benchlib.measure(benchmark, step, benchlib.rounds(5))
    finally:
        torch.set_num_threads(previous)
    med = benchlib.median(seconds)
    voxels = BATCH * size**3
    # Forward FLOPs are counted; backward is about twice the forward, so a step is about three forwards.
    forward_gflop = count_flops_per_voxel(PRESETS["fine"]) * voxels / 1e9
    benchmark.extra_info.update({"patches": BATCH, "patch": [size] * 3, "threads": THREADS, "median_s": med,
                                 "voxels_per_second": voxels / med, "forward_gflop": forward_gflop})
    benchlib.report("training", f"fine U-Net, {BATCH} x {size}^3, threads={THREADS}: {med:.3f} s/step, "
                                f"forward {forward_gflop:.1f} GFLOP")
