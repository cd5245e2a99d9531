"""Upstream's recipe: Adam-atan2 against steps computed by hand, the upstream-mirroring presets, epochs counted as
upstream's ``pretrain.py`` counts them, and the checkpoints kept per evaluation."""

from __future__ import annotations

import math

import pytest
import torch

from etrm.config import Config, ConfigError
from etrm.presets import load_preset
from etrm.train.adam_atan2 import A_DEFAULT, AdamAtan2

UPSTREAM_PRESETS = ("arc1", "arc2", "sudoku", "maze")


def _steps(grads: list[list[float]], start: list[float], **kw) -> torch.Tensor:
    """``start`` after one Adam-atan2 step per gradient in ``grads``."""
    p = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = AdamAtan2([p], **kw)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach()


def test_upstream_recipe_adam_atan2_matches_two_steps_by_hand() -> None:
    lr, b1, b2, wd, a = 0.1, 0.9, 0.99, 0.1, A_DEFAULT
    p0, g1, g2 = [1.0, -2.0, 0.5], [0.5, -3.0, 0.0], [-1.0, 2.0, 4.0]
    expected = []
    for x, u, w in zip(p0, g1, g2):
        m = v = 0.0
        for t, g in ((1, u), (2, w)):
            x *= 1 - lr * wd  # decoupled weight decay first
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            x -= lr * a * math.atan2(m_hat, math.sqrt(v_hat))
        expected.append(x)
    got = _steps([g1, g2], p0, lr=lr, betas=(b1, b2), weight_decay=wd)
    assert got.tolist() == pytest.approx(expected, abs=1e-12)
    # the first step of a coordinate with a gradient is exactly lr * a * pi / 4 (m_hat = g, sqrt(v_hat) = |g|)
    one = _steps([g1], p0, lr=lr, betas=(b1, b2), weight_decay=0.0)
    assert (torch.tensor(p0) - one).tolist() == pytest.approx([lr * a * math.pi / 4, -lr * a * math.pi / 4, 0.0])


def test_upstream_recipe_adam_atan2_ignores_gradient_scale_and_bounds_each_step() -> None:
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(64, generator=g, dtype=torch.float64).tolist() for _ in range(6)]  # around 1
    start = torch.randn(64, generator=g, dtype=torch.float64).tolist()
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    big = _steps(grads, start, **kw)
    tiny = _steps([[x * 1e-10 for x in row] for row in grads], start, **kw)
    torch.testing.assert_close(tiny, big, rtol=1e-9, atol=1e-12)
    # AdamW's epsilon dominates gradients of 1e-10: it barely moves where Adam-atan2 moves as at scale 1
    p = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    adamw = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    for row in grads:
        p.grad = torch.tensor(row, dtype=torch.float64) * 1e-10
        adamw.step()
    assert (p.detach() - torch.tensor(start, dtype=torch.float64)).abs().max() < 0.05 * (
        big - torch.tensor(start, dtype=torch.float64)).abs().max()
    # no coordinate ever moves more than lr * a * pi / 2 in one step, however the gradients jump
    q = torch.nn.Parameter(torch.zeros(64, dtype=torch.float64))
    opt = AdamAtan2([q], **kw)
    bound = 1e-2 * A_DEFAULT * math.pi / 2
    for i in range(40):
        before = q.detach().clone()
        q.grad = torch.randn(64, generator=g, dtype=torch.float64) * 10.0 ** ((i % 9) - 4)
        opt.step()
        assert float((q.detach() - before).abs().max()) <= bound + 1e-15


@pytest.mark.parametrize("name", UPSTREAM_PRESETS)
def test_upstream_recipe_presets_use_adam_atan2_without_clipping(name: str) -> None:
    cfg = Config.from_dict(load_preset(name))
    assert (cfg.train.optimizer, cfg.train.grad_clip) == ("adam-atan2", 0.0)
    assert Config().train.optimizer == "adamw"  # our default stays AdamW
    with pytest.raises(ConfigError, match="train.optimizer='sgd'.*adamw, adam-atan2"):
        Config.from_dict({"train": {"optimizer": "sgd"}})


def test_upstream_recipe_trainer_steps_with_adam_atan2(make_trainer) -> None:
    trainer = make_trainer("trm", "train.optimizer=\"adam-atan2\"", "train.grad_clip=0")
    adam = trainer.optimizers[0]
    assert isinstance(adam, AdamAtan2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    for _ in range(3):
        trainer.train_step()
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(adam.state[p]["step"] == 3 for p in adam.param_groups[0]["params"] if p in adam.state)
    again = make_trainer("trm", "train.optimizer=\"adam-atan2\"", "train.grad_clip=0")
    again.load_state_dict(trainer.state_dict())  # the optimizer state round-trips through a checkpoint
    assert again.optimizers[0].state_dict()["state"].keys() == adam.state_dict()["state"].keys()
