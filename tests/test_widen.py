"""Tests for heartseg.train.widen: a trained U-Net grown to more channels computes the same function."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("torch", reason="the training side needs PyTorch: pip install -e '.[train]'")
import torch
from heartseg.train.unet import UNetConfig, build_unet
from heartseg.train.widen import can_widen, widen_state_dict

torch.set_num_threads(1)

SMALL = UNetConfig(base_channels=2, depth=1, norm="instance")
BIG = UNetConfig(base_channels=4, depth=1, norm="instance")


def _trained(config: UNetConfig) -> torch.nn.Module:
    """A network whose weights and BatchNorm statistics are not at their initial values."""
    generator = torch.Generator().manual_seed(0)
    net = build_unet(config)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    net.train()
    for _ in range(3):
        net(torch.randn(2, config.in_channels, 16, 16, 16, generator=generator))
    return net.eval()


@pytest.mark.parametrize("norm", ["instance", "batch", "none"])
# (depth, max channels before, after): uncapped; capped levels that grow; capped levels that stay as they are.
@pytest.mark.parametrize("depth,max_small,max_big", [(2, 256, 256), (3, 12, 16), (3, 12, 12), (0, 256, 256)])
def test_grown_network_computes_the_same_function(norm: str, depth: int, max_small: int, max_big: int) -> None:
    small = UNetConfig(in_channels=2, out_channels=3, base_channels=3, depth=depth, norm=norm, max_channels=max_small)
    big = UNetConfig(in_channels=2, out_channels=3, base_channels=5, depth=depth, norm=norm, max_channels=max_big)
    net = _trained(small)
    grown = build_unet(big)
    grown.load_state_dict(widen_state_dict(net.state_dict(), small, big))
    x = torch.randn(2, 2, 16, 16, 24)
    for mode in ("eval", "train"):
        getattr(net, mode)(), getattr(grown, mode)()
        with torch.no_grad():
            expected = net(x)
            torch.testing.assert_close(grown(x), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in net.parameters())


def test_copied_channels_learn_apart() -> None:
    grown = build_unet(BIG)
    grown.load_state_dict(widen_state_dict(_trained(SMALL).state_dict(), SMALL, BIG))
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
    assert not can_widen(base, UNetConfig(in_channels=2, base_channels=12, depth=3, norm="instance"))
    assert not can_widen(base, UNetConfig(out_channels=2, base_channels=12, depth=3, norm="instance"))
    with pytest.raises(ValueError, match="cannot grow"):
        widen_state_dict(build_unet(base).state_dict(), base, UNetConfig(base_channels=8, depth=2, norm="instance"))


def test_weights_of_another_network_are_refused() -> None:
    state = build_unet(SMALL).state_dict()
    with pytest.raises(ValueError, match="extra"):
        widen_state_dict(dict(state, extra=torch.zeros(1)), SMALL, BIG)
    with pytest.raises(ValueError, match="head.bias"):
        widen_state_dict({k: v for k, v in state.items() if k != "head.bias"}, SMALL, BIG)
    with pytest.raises(ValueError, match="not those of"):
        widen_state_dict(build_unet(replace(SMALL, base_channels=3)).state_dict(), SMALL, BIG)


def test_growth_is_the_same_every_time() -> None:
    state = _trained(SMALL).state_dict()
    first, second = widen_state_dict(state, SMALL, BIG), widen_state_dict(state, SMALL, BIG)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
