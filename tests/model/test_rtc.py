"""RTC math (fplus.model.rtc): the soft mask of paper Eq. 5, the clipped guidance weight, and guided sampling
checked against hand computations, an exact Gaussian case, a coupled linear field and plain Euler sampling."""

import math

import numpy as np
import pytest
import torch

from fplus.model.flow_head import FlowActionHead
from fplus.model.rtc import guidance_weight, guided_sample, soft_mask

E = math.e


def w(c: float) -> float:
    """The soft mask's decay c (e^c - 1) / (e - 1), by hand."""
    return c * (math.exp(c) - 1) / (E - 1)


def test_soft_mask_equals_hand_computed_weights():
    # H=8, d=2, s=3: H-s = 5 overlapping actions; c_i = (5 - i) / 4 for i = 2, 3, 4
    expected = [1, 1, w(3 / 4), w(2 / 4), w(1 / 4), 0, 0, 0]
    np.testing.assert_allclose(soft_mask(8, 2, 3).numpy(), expected, rtol=1e-6, atol=0)
    np.testing.assert_allclose(expected[2:5], [0.487551, 0.188770, 0.041324], rtol=1e-5)  # the numbers
    # H=10, d=2, s=4 (the reference code's docstring example, start 2, end 6): c = 4/5 .. 1/5
    np.testing.assert_allclose(soft_mask(10, 2, 4).numpy(), [1, 1, w(.8), w(.6), w(.4), w(.2), 0, 0, 0, 0],
                               rtol=1e-6, atol=0)
    # no delay: the decay starts at step 0, c_0 = (H-s) / (H-s+1) < 1
    np.testing.assert_allclose(soft_mask(6, 0, 2).numpy(), [w(.8), w(.6), w(.4), w(.2), 0, 0], rtol=1e-6, atol=0)
    # d = H - s: a hard mask; s = H: nothing overlaps; s = 0 with d = 0: the whole chunk decays
    assert soft_mask(8, 3, 5).tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert soft_mask(8, 0, 8).tolist() == [0] * 8
    full = soft_mask(8, 0, 0)
    assert full[-1].item() == pytest.approx(w(1 / 9)) and (full[:-1] >= full[1:]).all() and full[0] < 1


@pytest.mark.parametrize("h,d,s", [(8, 4, 5), (8, 0, 9), (8, -1, 3), (8, 2, -1)])
def test_soft_mask_refuses_a_delay_past_the_overlap(h, d, s):
    with pytest.raises(ValueError):
        soft_mask(h, d, s)


def test_guidance_weight_is_the_papers_clipped_weight():
    for tau in (0.1, 0.3, 0.5, 0.7, 0.95):
        r2 = (1 - tau) ** 2 / (tau ** 2 + (1 - tau) ** 2)
        assert guidance_weight(tau, 1e9) == pytest.approx((1 - tau) / (tau * r2), rel=1e-12)
    assert guidance_weight(0.5, 5.0) == pytest.approx(2.0)  # the minimum of the unclipped weight
    assert guidance_weight(0.1, 5.0) == 5.0  # (0.01 + 0.81) / 0.09 = 9.1 is clipped
    assert guidance_weight(0.1, 100.0) == pytest.approx(0.82 / 0.09)
    assert guidance_weight(0.0, 5.0) == 5.0 and guidance_weight(1.0, 5.0) == 5.0  # infinite there: beta


def _head_and_inputs(b=3, h=8, a=3, d_model=16, seed=0):
    torch.manual_seed(seed)
    head = FlowActionHead(d_model, a, h, width=32, layers=2, heads=4, time_dim=16).eval()
    act_h = torch.randn(b, h, d_model)
    return head, act_h, torch.randn(b, h, a), torch.randn(b, h, a)


def test_zero_weights_give_plain_sampling_bit_for_bit():
    head, act_h, noise, prefix = _head_and_inputs()
    plain = head.sample(act_h, noise, 10)
    velocity = lambda x, tau: head.velocity(act_h, x, tau)  # noqa: E731
    for weights in (torch.zeros(8), soft_mask(8, 0, 8)):  # d = 0 and nothing overlaps
        assert torch.equal(guided_sample(velocity, noise, prefix, weights, 10, 5.0), plain)
    # with a prefix the guidance pulls the frozen steps onto it: for this random (untrained) head the mean distance
    # falls from 1.30 (plain sampling) to 0.018 (measured)
    guided = guided_sample(velocity, noise, prefix, soft_mask(8, 2, 3), 10, 5.0)
    assert not torch.equal(guided, plain)
    near = (guided[:, :2] - prefix[:, :2]).abs().mean()
    assert near < 0.05 * (plain[:, :2] - prefix[:, :2]).abs().mean()


def gaussian_velocity(x: torch.Tensor, tau: float) -> torch.Tensor:
    """The exact flow-matching velocity of data N(0, I) (x_tau = tau x1 + (1-tau) x0): E[x1 - x0 | x_tau = x] =
    (2 tau - 1) / (tau^2 + (1-tau)^2) x; its one-step estimate x + (1-tau) v = tau x / (tau^2 + (1-tau)^2) is the
    posterior mean of x1, whose posterior variance is exactly r_tau^2: the case the guidance weight is derived for."""
    return (2 * tau - 1) / (tau ** 2 + (1 - tau) ** 2) * x


def test_gaussian_case_with_a_hard_mask_reproduces_the_prefix_exactly():
    """For N(0, I) data and an unclipped weight, the guided velocity on a frozen step is (y - x) / (1 - tau), the
    conditional flow towards y: Euler then lands on y exactly at tau = 1 (x_k - y = (x_0 - y)(1 - tau_k)). The free
    steps (weight 0) are independent of the frozen ones here and equal plain sampling bit for bit."""
    g = torch.Generator().manual_seed(0)
    noise, prefix = torch.randn(2, 8, 3, generator=g, dtype=torch.float64), torch.randn(2, 8, 3, generator=g,
                                                                                         dtype=torch.float64)
    hard = soft_mask(8, 3, 5)  # [1, 1, 1, 0, ...]
    for steps in (4, 10, 50):
        out = guided_sample(gaussian_velocity, noise, prefix[:, :3], hard, steps, max_guidance=1e6)
        assert (out[:, :3] - prefix[:, :3]).abs().max().item() < 1e-12
        plain = guided_sample(gaussian_velocity, noise, prefix[:, :3], torch.zeros(8), steps, max_guidance=1e6)
        assert torch.equal(out[:, 3:], plain[:, 3:])
    # with the paper's clip beta = 5 the frozen steps stop short of y: the scalar recursion by hand
    # x <- x + dt (a x + min(5, k) j (y - j x)), j = tau / (tau^2 + (1-tau)^2), a = (2 tau - 1) / (...)
    steps = 10
    x, y = noise[:, :3].clone(), prefix[:, :3]
    for k in range(steps):
        tau = k / steps
        den = tau ** 2 + (1 - tau) ** 2
        a, j = (2 * tau - 1) / den, tau / den
        kw = 5.0 if tau == 0 else min(5.0, den / (tau * (1 - tau)))
        x = x + (1 / steps) * (a * x + kw * j * (y - j * x))
    out = guided_sample(gaussian_velocity, noise, prefix[:, :3], hard, steps, max_guidance=5.0)
    torch.testing.assert_close(out[:, :3], x, rtol=0, atol=1e-12)
    residual = ((out[:, :3] - y).abs().max() / (noise[:, :3] - y).abs().max()).item()
    assert 0.01 < residual < 0.05  # measured 0.026 of the initial distance: close to the prefix, not on it
    # exact again when the last step is unclipped: 5 steps end at tau = 0.8, weight 4.25 < 5, and dt = 1 - tau
    out5 = guided_sample(gaussian_velocity, noise, prefix[:, :3], hard, 5, max_guidance=5.0)
    assert (out5[:, :3] - y).abs().max().item() < 1e-12


def test_coupled_linear_field_matches_a_hand_written_vjp():
    """v(x, tau) = (1 - tau) M x + b with M (H, H) mixing the steps (not symmetric, so a transposed Jacobian would
    show): A1_hat = (I + (1-tau)^2 M) x + (1-tau) b, and the guidance is J^T (W * (Y - A1_hat)), J = I + (1-tau)^2 M.
    The frozen prefix pulls the free steps too, through M."""
    g = torch.Generator().manual_seed(1)
    h, a, b = 6, 2, 2
    m = 0.5 * torch.randn(h, h, generator=g, dtype=torch.float64)
    bias = torch.randn(h, a, generator=g, dtype=torch.float64)
    noise = torch.randn(b, h, a, generator=g, dtype=torch.float64)
    prefix = torch.randn(b, 4, a, generator=g, dtype=torch.float64)
    weights = soft_mask(h, 2, 2).double()

    def velocity(x, tau):
        return (1 - tau) * torch.einsum("ij,bja->bia", m, x) + bias

    steps, beta = 8, 5.0
    mn, bn, wn = m.numpy(), bias.numpy(), weights.numpy()[:, None]
    y = np.zeros((b, h, a))
    y[:, :4] = prefix.numpy()
    x = noise.numpy().copy()
    for k in range(steps):
        tau = k / steps
        v = (1 - tau) * np.einsum("ij,bja->bia", mn, x) + bn
        jac = np.eye(h) + (1 - tau) ** 2 * mn
        a1 = np.einsum("ij,bja->bia", jac, x) + (1 - tau) * bn
        grad = np.einsum("ji,bja->bia", jac, wn * (y - a1))  # J^T e
        x = x + (v + guidance_weight(tau, beta) * grad) / steps
    out = guided_sample(velocity, noise, prefix, weights, steps, beta)
    np.testing.assert_allclose(out.numpy(), x, rtol=0, atol=1e-12)
    free = guided_sample(velocity, noise, prefix, torch.zeros(h, dtype=torch.float64), steps, beta)
    assert (out[:, 4:] - free[:, 4:]).abs().max() > 1e-3  # weight 0 there, yet moved by the coupling


def test_guided_sample_refuses_weights_without_a_prefix_action():
    head, act_h, noise, prefix = _head_and_inputs()
    velocity = lambda x, tau: head.velocity(act_h, x, tau)  # noqa: E731
    with pytest.raises(ValueError, match="past the prefix"):
        guided_sample(velocity, noise, prefix[:, :3], soft_mask(8, 2, 3), 4)  # weights reach step 4
    with pytest.raises(ValueError, match="more than"):
        guided_sample(velocity, noise, torch.cat([prefix, prefix], 1), soft_mask(8, 2, 3), 4)
