"""Tests for heartseg.train.unet."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch", reason="the training side needs PyTorch: pip install -e '.[train]'")
import torch
from heartseg.train.losses import DiceBCELoss, soft_dice
from heartseg.train.unet import (
    PRESETS,
    UNet3D,
    UNetConfig,
    build_unet,
    count_flops_per_voxel,
)

torch.set_num_threads(1)

TINY = UNetConfig(in_channels=1, out_channels=1, base_channels=4, depth=2)


@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
def test_output_shape_matches_input(norm: str) -> None:
    torch.manual_seed(0)
    config = UNetConfig(in_channels=2, out_channels=3, base_channels=4, depth=2, norm=norm)
    net = build_unet(config).eval()
    x = torch.randn(2, 2, 8, 12, 16)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (2, 3, 8, 12, 16)


def test_channels_last_3d_matches_contiguous() -> None:
    torch.manual_seed(0)
    net = build_unet(TINY).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        ref = net(x)
        net_cl = net.to(memory_format=torch.channels_last_3d)
        out = net_cl(x.to(memory_format=torch.channels_last_3d))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bad_size_raises_with_divisor() -> None:
    net = build_unet(UNetConfig(base_channels=4, depth=3)).eval()
    assert net.required_divisor == 8
    with pytest.raises(ValueError, match="8"):
        net(torch.zeros(1, 1, 16, 12, 16))


def test_wrong_channel_count_raises() -> None:
    net = build_unet(TINY).eval()
    with pytest.raises(ValueError, match="channels"):
        net(torch.zeros(1, 2, 8, 8, 8))


def test_presets() -> None:
    expected = {"failed-project": (32, "batch"), "fine": (16, "instance"), "coarse": (8, "batch")}
    assert set(expected) <= set(PRESETS)
    for name, (base, norm) in expected.items():
        cfg = PRESETS[name]
        assert (cfg.base_channels, cfg.norm, cfg.depth) == (base, norm, 3)
        assert (cfg.in_channels, cfg.out_channels) == (1, 1)


def test_config_round_trip() -> None:
    cfg = UNetConfig(in_channels=2, out_channels=3, base_channels=12, depth=4, norm="instance", max_channels=64)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert UNetConfig.from_dict(data) == cfg
    with pytest.raises(ValueError):
        UNetConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ValueError):
        UNetConfig(norm="group")


def test_config_survives_weights_only_checkpoint(tmp_path) -> None:
    net = build_unet(TINY)
    path = tmp_path / "ckpt.pt"
    torch.save({"config": net.config.to_dict(), "state_dict": net.state_dict()}, path)
    loaded = torch.load(path, weights_only=True)
    net2 = build_unet(UNetConfig.from_dict(loaded["config"]))
    net2.load_state_dict(loaded["state_dict"])


def test_max_channels_caps_width() -> None:
    net = UNet3D(UNetConfig(base_channels=8, depth=3, max_channels=16)).eval()
    assert net.config.channels() == [8, 16, 16, 16]
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 8, 8, 8)).shape == (1, 1, 8, 8, 8)


def test_flops_per_voxel() -> None:
    fine = count_flops_per_voxel(PRESETS["fine"])
    assert 5e4 < fine < 2e5
    doubled = count_flops_per_voxel(UNetConfig(base_channels=32, depth=3))
    assert 3.5 < doubled / fine < 4.1
    assert count_flops_per_voxel(PRESETS["failed-project"]) == pytest.approx(doubled)
    assert count_flops_per_voxel(PRESETS["coarse"]) < fine


def test_flops_match_module_count() -> None:
    """Cross-check the analytical count against MACs counted from the instantiated layers."""
    cfg = UNetConfig(base_channels=4, depth=2)
    net = build_unet(cfg)
    side = 16
    macs = 0

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal macs
        kernel = module.weight[0].numel() if isinstance(module, torch.nn.Conv3d) else module.weight.shape[0]
        macs += output[0].numel() * kernel

    for m in net.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net.eval()(torch.zeros(1, 1, side, side, side))
    assert count_flops_per_voxel(cfg) == pytest.approx(2 * macs / side**3)


def test_tiny_net_overfits_cube() -> None:
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    target = torch.zeros(1, 1, 16, 16, 16)
    target[..., 4:11, 5:12, 3:10] = 1.0
    image = target * 2.0 + 0.5 * torch.randn(target.shape, generator=gen)
    net = build_unet(TINY)
    loss_fn = DiceBCELoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        loss = loss_fn(net(image), target)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = (net(image) > 0).float()
    assert float(soft_dice(pred, target)) > 0.9


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_traceable_without_shape_check(monkeypatch: pytest.MonkeyPatch) -> None:
    net = build_unet(TINY).eval()
    checked_while_tracing: list[bool] = []
    original = net._check_shape

    def spy(x: torch.Tensor) -> None:
        checked_while_tracing.append(torch.jit.is_tracing())
        original(x)

    monkeypatch.setattr(net, "_check_shape", spy)
    traced = torch.jit.trace(net, torch.randn(1, 1, 8, 8, 8))
    assert not any(checked_while_tracing)
    x = torch.randn(2, 1, 8, 12, 16)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), net(x))
