"""Tests for heartseg.train.widen: a trained U-Net grown to more channels computes the same function."""

from __future__ import annotations

import pytest

pytest.importorskip("torch", reason="the training side needs PyTorch: pip install -e '.[train]'")
import torch
from heartseg.train.unet import UNetConfig, build_unet
from heartseg.train.widen import can_widen, widen_state_dict

torch.set_num_threads(1)


def _trained(config: UNetConfig) -> torch.nn.Module:
    """A network whose weights and BatchNorm statistics are not at their initial values."""
    torch.manual_seed(0)
    net = build_unet(config)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.1 * torch.randn_like(param))
    net.train()
    for _ in range(3):
        net(torch.randn(2, config.in_channels, 16, 16, 16))
    return net.eval()


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
@pytest.mark.parametrize("depth,max_channels", [(2, 256), (3, 12)])
def test_grown_network_computes_the_same_function(norm: str, depth: int, max_channels: int) -> None:
    small = UNetConfig(in_channels=2, out_channels=3, base_channels=3, depth=depth, norm=norm,
                       max_channels=max_channels)
    big = UNetConfig(in_channels=2, out_channels=3, base_channels=5, depth=depth, norm=norm,
                     max_channels=max_channels + 4)
    net = _trained(small)
    grown = build_unet(big)
    grown.load_state_dict(widen_state_dict(net.state_dict(), small, big, seed=1))
    x = torch.randn(2, 2, 16, 16, 24)
    for mode in ("eval", "train"):
        getattr(net, mode)(), getattr(grown, mode)()
        with torch.no_grad():
            expected = net(x)
            torch.testing.assert_close(grown(x), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in net.parameters())


def test_copied_channels_learn_apart() -> None:
    small, big = UNetConfig(base_channels=2, depth=1, norm="instance"), UNetConfig(base_channels=4, depth=1, norm="instance")
    grown = build_unet(big)
    grown.load_state_dict(widen_state_dict(_trained(small).state_dict(), small, big, seed=0))
    conv = grown.encoders[0][0].weight  # 4 output channels: the old 2, then copies of them
    copy_of = [c for c in range(2) if torch.equal(conv[2], conv[c])]
    assert copy_of, "a new channel starts as a copy of an old one"
    optimiser = torch.optim.SGD(grown.parameters(), lr=0.1)
    grown.train()
    loss = grown(torch.randn(2, 1, 8, 8, 8)).pow(2).mean()
    loss.backward()
    optimiser.step()
    assert not torch.allclose(conv[2], conv[copy_of[0]]), "one training step must tell a copy from its source"


def test_only_more_channels_can_be_grown() -> None:
    base = UNetConfig(base_channels=8, depth=3, norm="instance")
    assert can_widen(base, UNetConfig(base_channels=12, depth=3, norm="instance"))
    assert not can_widen(base, base)
    assert not can_widen(base, UNetConfig(base_channels=4, depth=3, norm="instance"))
    assert not can_widen(base, UNetConfig(base_channels=12, depth=2, norm="instance"))
    assert not can_widen(base, UNetConfig(base_channels=12, depth=3, norm="batch"))
    assert not can_widen(base, UNetConfig(base_channels=12, depth=3, norm="instance", max_channels=32))
    with pytest.raises(ValueError, match="cannot grow"):
        widen_state_dict(build_unet(base).state_dict(), base, UNetConfig(base_channels=8, depth=2, norm="instance"))


def test_weights_of_another_network_are_refused() -> None:
    small, big = UNetConfig(base_channels=2, depth=1, norm="instance"), UNetConfig(base_channels=4, depth=1, norm="instance")
    state = dict(build_unet(small).state_dict(), extra=torch.zeros(1))
    with pytest.raises(ValueError, match="extra"):
        widen_state_dict(state, small, big)
