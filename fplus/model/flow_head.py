"""FlowActionHead: conditional flow matching over the whole action chunk (DESIGN 5, `ACTION_HEAD=flow`).

Everything lives in the NORMALISED action space. Convention of the RTC paper (Black, Galliker, Levine 2025) and
of pi0: tau = 0 is noise, tau = 1 is data.

    x_0 ~ N(0, I)  (B, H, A)          x_1 = the normalised action chunk
    x_tau = tau x_1 + (1 - tau) x_0   target velocity u = x_1 - x_0
    L_action = masked_mse(v(act_h, x_tau, tau), u, pad)           (the MSE head's helper: padded steps do not count)
    sampling: x <- x + (1/n) v(act_h, x, k/n), k = 0 .. n-1 (Euler from noise, n = FLOW_STEPS)

The velocity network reads, per chunk step i, the ACT hidden state i (after the memory injection), the noisy
action x_i, a learned step embedding and a sinusoidal embedding of tau, then mixes the H steps with pre-LN
self-attention blocks: the steps must see each other, otherwise RTC's guidance (a vector-Jacobian product
through the velocity, fplus.model.rtc) could not carry the frozen prefix into the rest of the chunk. Attention is
written out with plain matmuls (no fused kernel), so `velocity` gives the same bits with and without autograd:
RTC with an all-zero mask equals plain sampling bit for bit.

Padding: in training, steps past the episode end (pad) are masked out of the loss AND out of the attention keys,
so the valid steps' velocities do not depend on what the data pipeline put at padded steps.

tau sampling (FLOW_TAU): `beta` (the default, pi0's): tau = 0.999 (1 - u), u ~ Beta(1.5, 1), which favours the
noisy end (density proportional to sqrt(1 - tau/0.999)); drawn by the inverse CDF u = U^(2/3) from a uniform, so
it comes from the recipe's torch.Generator and resume stays bit-identical. `uniform`: tau ~ U[0, 1) (the RTC
reference implementation's choice).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fplus.model.action_head import masked_mse

TAU_MAX = 0.999  # pi0: tau stays below 1, where x_tau would be the data itself
MIN_PERIOD, MAX_PERIOD = 4e-3, 4.0  # periods of the sinusoidal time embedding (tau in [0, 1])


def time_embedding(tau: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of tau (B,) -> (B, dim): [sin(2 pi tau / p_k), cos(2 pi tau / p_k)] for dim/2 periods
    p_k spaced geometrically from MIN_PERIOD to MAX_PERIOD (fine enough to tell Euler steps 1/n apart)."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=tau.device) / max(half - 1, 1)
    period = MIN_PERIOD * (MAX_PERIOD / MIN_PERIOD) ** exponent
    angle = tau.float()[:, None] * (2 * math.pi / period)[None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


class _Block(nn.Module):
    """Pre-LN transformer block over the H chunk steps: x + Attn(LN x), then x + MLP(LN x)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        b, h, w = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, h, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(w // self.heads)  # (B, heads, H, H)
        if pad is not None:  # padded steps are no keys (a finite fill: a fully padded row stays finite)
            scores = scores.masked_fill(pad[:, None, None, :], torch.finfo(scores.dtype).min)
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, h, w)
        x = x + self.proj(attn)
        return x + self.mlp(self.norm2(x))


class FlowActionHead(nn.Module):
    """(B, H, d) ACT hidden states -> a velocity field over (B, H, A) normalised action chunks.

    Args:
        hidden_size: d. action_dim: A. horizon: H. width, layers, heads: the velocity network (FLOW_WIDTH,
        FLOW_LAYERS, FLOW_HEADS). time_dim: size of the sinusoidal tau embedding (FLOW_TIME_DIM).
        tau_sampling: `beta` (pi0) or `uniform` (FLOW_TAU), the training distribution of tau.
    """

    def __init__(self, hidden_size: int, action_dim: int, horizon: int, width: int = 256, layers: int = 2,
                 heads: int = 4, time_dim: int = 64, tau_sampling: str = "beta"):
        super().__init__()
        if width % heads:
            raise ValueError(f"flow head width {width} is not a multiple of its {heads} heads")
        if tau_sampling not in ("beta", "uniform"):
            raise ValueError(f"unknown tau sampling {tau_sampling!r}: beta or uniform")
        self.action_dim, self.horizon, self.time_dim, self.tau_sampling = action_dim, horizon, time_dim, tau_sampling
        self.cond = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, width))
        self.x_in = nn.Linear(action_dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.step = nn.Parameter(0.02 * torch.randn(horizon, width))
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, action_dim)

    def velocity(self, act_h: torch.Tensor, x: torch.Tensor, tau: float | torch.Tensor,
                 pad: torch.Tensor | None = None) -> torch.Tensor:
        """v(act_h, x, tau): act_h (B, H, d), x (B, H, A) noisy normalised chunk, tau a float or (B,) -> (B, H, A)
        float32 (float64 for a float64 head). Differentiable w.r.t. x (RTC takes a vector-Jacobian product).
        pad (B, H) bool: steps that are no attention keys (training at episode ends); None at inference."""
        tau = torch.as_tensor(tau, dtype=torch.float32, device=x.device).expand(x.shape[0])
        temb = self.time_mlp(time_embedding(tau, self.time_dim).to(x.dtype))  # (B, width)
        h = self.cond(act_h) + self.x_in(x.to(act_h.dtype)) + self.step.to(act_h.dtype) + temb[:, None]
        for block in self.blocks:
            h = block(h, pad)
        v = self.out(self.norm(h))
        return v.to(torch.promote_types(v.dtype, torch.float32))  # float32 (float64 for a float64 head)

    def sample(self, act_h: torch.Tensor, noise: torch.Tensor, steps: int) -> torch.Tensor:
        """Euler integration of the velocity from `noise` (B, H, A) at tau = 0 to tau = 1 in `steps` steps ->
        normalised actions (B, H, A), float32."""
        x, dt = noise.float(), 1.0 / steps
        for k in range(steps):
            x = x + dt * self.velocity(act_h, x, k * dt)
        return x

    def draw(self, batch_size: int, generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Training draws (tau (B,), noise (B, H, A)) from `generator` on its device (the recipe's is on the CPU;
        the global CPU stream without one), moved to `device`."""
        on = "cpu" if generator is None else generator.device
        u = torch.rand(batch_size, generator=generator, device=on)
        tau = TAU_MAX * (1 - u ** (2 / 3)) if self.tau_sampling == "beta" else u  # u^(2/3) ~ Beta(1.5, 1)
        noise = torch.randn(batch_size, self.horizon, self.action_dim, generator=generator, device=on)
        return tau.to(device), noise.to(device)

    def loss(self, act_h: torch.Tensor, target: torch.Tensor, pad: torch.Tensor, tau: torch.Tensor | None = None,
             noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow-matching loss: masked MSE between v(act_h, x_tau, tau) and x_1 - x_0 over the non-padded steps.
        target: normalised actions (B, H, A); pad (B, H) bool; tau (B,) and noise (B, H, A) from `draw` (drawn
        here from `generator` when not given)."""
        if tau is None or noise is None:
            tau, noise = self.draw(target.shape[0], generator, target.device)
        x1, x0 = target.float(), noise.float()
        t = tau.float()[:, None, None]
        x_tau = t * x1 + (1 - t) * x0
        return masked_mse(self.velocity(act_h, x_tau, tau, pad), x1 - x0, pad)
