"""Real-time chunking (RTC): inpaint the frozen prefix of a new action chunk during flow sampling.

Black, Galliker, Levine 2025, "Real-Time Execution of Action Chunking Flow Policies" (arXiv 2506.07339), section
4 and Algorithm 1 (GUIDEDINFERENCE). Notation: H the prediction horizon, d the inference delay (control steps
between the observation and the new chunk being ready), s the execution horizon (actions of a chunk executed
before the next inference starts). When the new chunk A_new arrives, the previous chunk still has H - s actions
that overlap it: its first d are executed no matter what (frozen), the rest may still be changed. Y is the
previous chunk's remaining actions, aligned with the new chunk's steps 0 .. H-s-1.

    flow convention: tau = 0 noise, tau = 1 data; Euler step A <- A + (1/n) v(A, o, tau)        (paper Eq. 1)
    A1_hat   = A + (1 - tau) v(A, o, tau)                the one-step estimate of the final chunk   (Eq. 3)
    r_tau^2  = (1 - tau)^2 / (tau^2 + (1 - tau)^2)                                                (Eq. 4)
    v_guided = v + min(beta, (1 - tau) / (tau r_tau^2)) * (Y - A1_hat)^T diag(W) dA1_hat/dA      (Eq. 2)
    W_i      = 1                                  i < d                                          (Eq. 5, soft
               c_i (e^{c_i} - 1) / (e - 1)        d <= i < H - s,  c_i = (H-s-i) / (H-s-d+1)      masking)
               0                                  i >= H - s

Equation numbers as we read the paper (the guidance is pseudoinverse guidance, PiGDM, adapted to flows); the
formulas agree with the authors' reference code (github real-time-chunking-kinetix, `realtime_action` and
`get_prefix_weights` with start = d, end = H - s). beta (RTC_MAX_GUIDANCE) is the paper's guidance clip, 5.
(1 - tau) / (tau r_tau^2) = (tau^2 + (1-tau)^2) / (tau (1-tau)) is >= 2 on (0, 1) (2 at tau = 1/2) and infinite at
tau = 0 and tau = 1, where it is clipped to beta.

Why this weight: for data N(0, I), x1 | x_tau is Gaussian with mean A1_hat and variance r_tau^2, so the guided
velocity on a frozen step is (Y - A) / (1 - tau), and with a hard mask the guided Euler chain ends exactly at the
prefix whenever the last step's weight is not clipped (tests/model/test_rtc.py; with beta = 5 and 10 steps the last
weight, 9.1 at tau = 0.9, is clipped and 2.6 % of the initial distance remains). For a learnt field the clip and
the approximation leave the first d actions close to, not equal to, the prefix; the chunk scheduler executes the
prefix itself, and FPlusPolicy.predict writes the prefix over the first d actions it returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def soft_mask(horizon: int, delay: int, execution_horizon: int) -> torch.Tensor:
    """The prefix weights W (H,) of paper Eq. 5 (indices 0-based): 1 for i < d (frozen), c_i (e^c_i - 1)/(e - 1)
    with c_i = (H-s-i)/(H-s-d+1) for d <= i < H - s (decaying towards 0), 0 for i >= H - s (no previous action).
    Needs 0 <= s <= H and 0 <= d <= H - s (the previous chunk must cover the delay)."""
    h, d, s = horizon, delay, execution_horizon
    if not 0 <= s <= h:
        raise ValueError(f"execution horizon s={s} must lie in 0..H={h}")
    if not 0 <= d <= h - s:
        raise ValueError(f"inference delay d={d} must lie in 0..H-s={h - s} (the overlap with the previous chunk)")
    i = torch.arange(h, dtype=torch.float64)
    c = (h - s - i) / (h - s - d + 1)
    w = torch.where(i < d, torch.ones_like(c), c * torch.expm1(c) / (math.e - 1))
    return torch.where(i >= h - s, torch.zeros_like(w), w).float()


def guidance_weight(tau: float, max_guidance: float) -> float:
    """min(beta, (1 - tau) / (tau r_tau^2)) with r_tau^2 = (1-tau)^2 / (tau^2 + (1-tau)^2) (paper Eq. 2, 4); the
    unclipped weight is infinite at tau = 0 (and tau = 1), so there it is beta."""
    if tau <= 0.0 or tau >= 1.0:
        return max_guidance
    r2 = (1 - tau) ** 2 / (tau ** 2 + (1 - tau) ** 2)
    return min(max_guidance, (1 - tau) / (tau * r2))


def guided_sample(velocity: Callable[[torch.Tensor, float], torch.Tensor], noise: torch.Tensor,
                  prefix: torch.Tensor, weights: torch.Tensor, steps: int, max_guidance: float = 5.0) -> torch.Tensor:
    """RTC sampling (paper Algorithm 1): Euler integration from `noise` (B, H, A) at tau = 0 to tau = 1 in `steps`
    steps of the guided velocity (module docstring). Per step, with tau = k / steps:

        A1_hat = x + (1 - tau) v(x, tau);  e = (Y - A1_hat) * W;  g = e^T dA1_hat/dx  (a vector-Jacobian product)
        x <- x + (1/steps) (v + guidance_weight(tau, beta) g)

    Args:
        velocity: (x (B, H, A), tau float) -> v (B, H, A), differentiable w.r.t. x.
        prefix: Y (B, P, A), P <= H, in the space of x (normalised actions); steps past P need weight 0.
        weights: W (H,) or (B, H), e.g. `soft_mask`. max_guidance: beta (RTC_MAX_GUIDANCE).
    Returns x at tau = 1 (the dtype of `noise`, at least float32). With all weights 0 the result equals plain Euler
    sampling (`FlowActionHead.sample`) bit for bit: g is exactly 0 and the update is the same expression.
    """
    x = noise if noise.dtype == torch.float64 else noise.float()
    b, h, a = x.shape
    w = weights.to(x.device, x.dtype)
    w = (w[None] if w.dim() == 1 else w).expand(b, h)
    p = prefix.shape[1]
    if p > h:
        raise ValueError(f"the prefix has {p} actions, more than the chunk's {h}")
    if p < h and bool((w[:, p:] != 0).any()):
        raise ValueError(f"weights are nonzero past the prefix's {p} actions: no previous action to match there")
    target = torch.zeros_like(x)
    target[:, :p] = prefix.to(x.device, x.dtype)
    w = w[..., None]
    dt = 1.0 / steps
    for k in range(steps):
        tau = k * dt
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            v = velocity(x_in, tau)
            a1_hat = x_in + (1 - tau) * v
            error = (target - a1_hat.detach()) * w
            (g,) = torch.autograd.grad(a1_hat, x_in, error)
        x = x + dt * (v.detach() + guidance_weight(tau, max_guidance) * g)
    return x
