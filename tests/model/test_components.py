import math

import numpy as np
import pytest
import torch

from fplus.errors import FplusError
from fplus.model.action_head import ActionHead, masked_mse
from fplus.model.align import FutureAlignment
from fplus.model.corruption import corrupt_memory, shuffle_donors
from fplus.model.injection import GatedCrossAttention
from fplus.model.normalize import Normalizer
from fplus.model.prophet import Prophet, world_loss


def test_masked_mse_ignores_padded_steps():
    pred = torch.zeros(2, 3, 2)
    target = torch.ones(2, 3, 2)
    pad = torch.tensor([[False, False, True], [False, True, True]])
    assert masked_mse(pred, target, pad).item() == pytest.approx(1.0)
    target[0, 2] = 100.0
    target[1, 1:] = -50.0
    assert masked_mse(pred, target, pad).item() == pytest.approx(1.0)
    target[0, 0] = 3.0  # 3 valid steps x 2 dims: errors 9, 9 on that step, 1 elsewhere
    assert masked_mse(pred, target, pad).item() == pytest.approx((9 + 9 + 1 + 1 + 1 + 1) / 6)


def test_action_head_shapes():
    head = ActionHead(hidden_size=16, action_dim=4, horizon=5)
    h = torch.randn(3, 5, 16)
    assert head.predict(h).shape == (3, 5, 4)
    loss = head.loss(h, torch.randn(3, 5, 4), torch.zeros(3, 5, dtype=torch.bool))
    loss.backward()
    assert head.step.grad is not None


def test_world_loss_is_one_minus_cosine_over_valid_steps():
    z = torch.randn(2, 3, 8)
    loss, cos = world_loss(z, z, torch.ones(2, 3, dtype=torch.bool))
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and cos.item() == pytest.approx(1.0)
    other = z.clone()
    other[:, 2] = -z[:, 2]  # opposite at step 2, masked out
    valid = torch.tensor([[True, True, False], [True, True, False]])
    assert world_loss(z, other, valid)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert world_loss(z, other, torch.ones(2, 3, dtype=torch.bool))[0].item() == pytest.approx(2 / 3, abs=1e-5)


def test_prophet_shapes_and_delta_mode():
    p = Prophet(latent_dim=8, history=4, future=3, width=16, layers=1, heads=2)
    assert p(torch.randn(2, 4, 8)).shape == (2, 3, 8)
    d = Prophet(latent_dim=8, history=4, future=3, width=16, layers=1, heads=2, delta=True)
    torch.nn.init.zeros_(d.out.weight)
    torch.nn.init.zeros_(d.out.bias)
    z = torch.randn(2, 4, 8)
    torch.testing.assert_close(d(z), z[:, -1:].expand(-1, 3, -1))
    with pytest.raises(ValueError, match="expects 4 history"):
        p(torch.randn(2, 3, 8))


def test_prophet_learns_a_toy_dynamics():
    torch.manual_seed(0)
    d, t_hist, k = 8, 4, 2
    freqs = torch.linspace(0.2, 0.9, d)

    def batch(n):
        phase = torch.rand(n, 1, 1) * 2 * math.pi
        steps = torch.arange(t_hist + k).view(1, -1, 1)
        z = torch.sin(freqs * steps + phase) + 0.5
        return z[:, :t_hist], z[:, t_hist:]

    p = Prophet(latent_dim=d, history=t_hist, future=k, width=32, layers=1, heads=2)
    opt = torch.optim.AdamW(p.parameters(), lr=3e-3)
    valid = torch.ones(64, k, dtype=torch.bool)
    losses = []
    for _ in range(150):
        hist, fut = batch(64)
        loss, _ = world_loss(p(hist), fut, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.2 * np.mean(losses[:10])


def test_injection_is_identity_at_init_and_the_gate_gets_gradient():
    torch.manual_seed(0)
    inj = GatedCrossAttention(hidden_size=16, latent_dim=8, heads=2)
    act = torch.randn(3, 5, 16, requires_grad=True)
    memory = torch.randn(3, 2, 8)
    out = inj(act, memory)
    assert torch.equal(out, act) and inj.gate_value == 0.0
    out.pow(2).sum().backward()
    assert inj.gate.grad is not None and inj.gate.grad.abs().item() > 0
    # at gate 0 the attention weights get no gradient yet; they start learning once the gate opens
    assert inj.attn.in_proj_weight.grad.abs().max().item() == 0.0
    with torch.no_grad():
        inj.gate.fill_(0.5)
    assert not torch.allclose(inj(act, memory), act)


def test_alignment_loss_shapes():
    al = FutureAlignment(hidden_size=16, latent_dim=8, layer=1)
    loss, cos = al.loss(torch.randn(2, 3, 16), torch.randn(2, 4, 8), torch.ones(2, 4, dtype=torch.bool))
    assert loss.ndim == 0 and -1 <= cos.item() <= 1


def test_corruption_modes():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(6, 3, 4)
    oracle = torch.randn(6, 3, 4)
    present = torch.randn(6, 4)
    assert torch.equal(corrupt_memory("none", pred, oracle), pred)
    assert torch.equal(corrupt_memory("zero", pred, oracle), torch.zeros_like(pred))
    assert torch.equal(corrupt_memory("oracle", pred, oracle), oracle)
    history = corrupt_memory("history", pred, oracle, present)
    assert torch.equal(history, present[:, None].expand(6, 3, 4))
    donors = torch.tensor([3, 4, 5, 0, 1, 2])
    assert torch.equal(corrupt_memory("shuffle", pred, donors=donors), pred[donors])
    big = corrupt_memory("random", torch.zeros(4000, 3, 4), None, generator=g)  # standardised space: N(0, 1)
    torch.testing.assert_close(big.mean(dim=(0, 1)), torch.zeros(4), atol=0.05, rtol=0)
    torch.testing.assert_close(big.std(dim=(0, 1)), torch.ones(4), atol=0.05, rtol=0)
    with pytest.raises(FplusError, match="needs the true future"):
        corrupt_memory("oracle", pred, None)
    with pytest.raises(FplusError, match="needs the present"):
        corrupt_memory("history", pred, oracle)
    with pytest.raises(FplusError, match="needs donors"):
        corrupt_memory("shuffle", pred, oracle)
    with pytest.raises(FplusError, match="unknown corruption mode 'noise'"):
        corrupt_memory("noise", pred, oracle)


def test_shuffle_donors_always_come_from_another_episode():
    g = torch.Generator().manual_seed(1)
    # validation in episode order used to give 96% same-episode memories; donors never share the episode
    for episodes in ([0, 0, 0, 1, 1, 1], [5, 5, 2, 2, 7, 7, 7, 9], [0, 1], [3, 3, 1, 1, 1, 2]):
        for _ in range(20):
            perm, ok = shuffle_donors(episodes, g)
            assert sorted(perm.tolist()) == list(range(len(episodes)))
            assert ok.all() and all(episodes[perm[i]] != episodes[i] for i in range(len(episodes)))
    # one episode holds more than half: its surplus cannot get another episode's memory and is marked
    episodes = [4, 4, 4, 4, 4, 1, 2]
    perm, ok = shuffle_donors(episodes, g)
    assert int(ok.sum()) == 4 and all(episodes[perm[i]] != episodes[i] for i in range(7) if ok[i])
    assert shuffle_donors([3, 3, 3], g) is None and shuffle_donors([1], g) is None


def test_normalizer_modes_round_trip():
    stats = {"mean": np.array([1.0, 2.0, 0.0]), "std": np.array([2.0, 0.5, 0.0]),
             "q01": np.array([-1.0, 0.0, 3.0]), "q99": np.array([1.0, 4.0, 3.0])}
    x = torch.tensor([[3.0, 2.5, 0.0], [1.0, 0.0, 3.0]])
    ms = Normalizer.from_stats(stats, "mean_std", "action")
    torch.testing.assert_close(ms(x)[0, :2], torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(ms.inverse(ms(x)), x)
    q = Normalizer.from_stats(stats, "quantile", "action")
    torch.testing.assert_close(q(torch.tensor([[-1.0, 0.0, 3.0], [1.0, 4.0, 3.0]]))[:, :2],
                               torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    torch.testing.assert_close(q.inverse(q(x)), x)
    with pytest.raises(FplusError, match="no \\['q01', 'q99'\\]"):
        Normalizer.from_stats({"mean": [0.0], "std": [1.0]}, "quantile", "action")
