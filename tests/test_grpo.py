"""GRPO pieces against hand-computed float64 values on small tensors."""
import math

import pytest
import torch

from lmmr1_kernels import token_weights
from lmmr1_kernels.grpo_loss import per_token_terms
from lmmr1_lite.step import group_advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5,   2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4, "group")
    # group 1: mean 0.5, sample std sqrt(((.5)^2*2)/3) = sqrt(1/6)
    std = math.sqrt(1 / 6)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert torch.allclose(adv.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert torch.isfinite(adv).all(), "a group of equal rewards must give 0, not NaN"
    centred = group_advantages(rewards, 4, "none")
    assert torch.allclose(centred, torch.tensor([0.5, -0.5, 0, 0, 0, 0, 0, 0]))


def test_per_token_terms_by_hand():
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    old = torch.tensor([-1.5, -0.5, -1.0, -0.5], dtype=torch.float64)  # ratios e^.5, e^-.5, 1, e^-.5
    ref = torch.tensor([-1.2, -0.8, -1.0, -1.0], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, 2.0, 1.0], dtype=torch.float64)
    beta = 0.1
    loss, grad, ratio, kl, low, high = per_token_terms(logp, old, ref, adv, beta, 0.2, 0.3)
    r = [math.exp(0.5), math.exp(-0.5), 1.0, math.exp(-0.5)]
    # token 0: A>0, ratio 1.65 > 1.3 -> clipped high: pg = -1.3 * 1, no pg gradient
    # token 1: A<0, ratio 0.61 < 0.8 -> clipped low: pg = -0.8 * -1 = 0.8, no pg gradient
    # token 2: ratio 1, unclipped: pg = -2
    # token 3: A>0, ratio 0.61 < 0.8: min picks the unclipped ratio*A (smaller): pg = -0.61, gradient -A*ratio
    pg = [-1.3, 0.8, -2.0, -r[3]]
    k3 = [math.exp(d) - d - 1 for d in (-0.2, 0.2, 0.0, 0.0)]
    assert torch.allclose(loss, torch.tensor([p + beta * k for p, k in zip(pg, k3)], dtype=torch.float64))
    dkl = [beta * (1 - math.exp(d)) for d in (-0.2, 0.2, 0.0, 0.0)]
    dpg = [0.0, 0.0, -2.0, -r[3]]
    assert torch.allclose(grad, torch.tensor([a + b for a, b in zip(dpg, dkl)], dtype=torch.float64))
    assert low.tolist() == [False, True, False, False] and high.tolist() == [True, False, False, False]
    assert torch.allclose(ratio, torch.tensor(r, dtype=torch.float64)) and (kl >= 0).all()


def test_token_weights_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    tm = token_weights(mask, "token_mean")
    assert torch.allclose(tm, mask / 4.0)
    sm = token_weights(mask, "seq_mean_token_mean")
    assert torch.allclose(sm[0], torch.tensor([1 / 9, 1 / 9, 1 / 9, 0])) and torch.allclose(sm[1, 0], torch.tensor(1 / 3))
    assert sm[2].sum() == 0, "a fully masked row contributes nothing and no NaN"
    dr = token_weights(mask, "seq_mean_token_sum_norm")
    assert torch.allclose(dr, mask / 12.0)
    with pytest.raises(ValueError, match="loss_agg"):
        token_weights(mask, "sum")
