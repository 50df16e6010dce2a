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


def test_action_head_is_an_mlp_per_step_and_its_step_embedding_gets_the_summed_gradient():
    torch.manual_seed(0)
    head = ActionHead(hidden_size=16, action_dim=4, horizon=5)
    with torch.no_grad():
        head.step.copy_(torch.randn(5, 16))  # zero at init: give each step its own offset
    h = torch.randn(3, 5, 16, requires_grad=True)
    pred = head.predict(h)
    assert pred.shape == (3, 5, 4)
    # independent computation: LayerNorm -> Linear(16, 32) -> GELU -> Linear(32, 4) on h + step[h]
    norm, first, _, last = head.mlp
    assert (first.in_features, first.out_features, last.in_features) == (16, 32, 32)
    x = torch.nn.functional.layer_norm(h + head.step, (16,), norm.weight, norm.bias, norm.eps)
    expected = torch.nn.functional.gelu(x @ first.weight.T + first.bias) @ last.weight.T + last.bias
    torch.testing.assert_close(pred, expected, rtol=1e-5, atol=1e-6)
    # step h reads hidden state h only: changing ACT state 2 changes the actions of step 2 alone
    moved = h.detach().clone()
    moved[:, 2] += torch.randn(16)  # not a constant shift: the LayerNorm would remove that
    diff = (head.predict(moved) - pred).abs().amax(dim=(0, 2))
    assert diff[2] > 1e-3 and diff[[0, 1, 3, 4]].max().item() == 0.0
    target, pad = torch.randn(3, 5, 4), torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True
    loss = head.loss(h, target, pad)
    assert loss.item() == pytest.approx(masked_mse(pred, target, pad).item(), rel=1e-6)
    loss.backward()
    # the step embedding is added to every sample's state h: its gradient is the batch sum of dL/dh
    torch.testing.assert_close(head.step.grad, h.grad.sum(0), rtol=1e-5, atol=1e-7)
    assert h.grad[1, 3:].abs().max().item() == 0.0  # padded steps get no gradient


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
    torch.manual_seed(0)
    p = Prophet(latent_dim=8, history=4, future=3, width=16, layers=1, heads=2)
    z = torch.randn(2, 4, 8)
    assert p(z).shape == (2, 3, 8)
    d = Prophet(latent_dim=8, history=4, future=3, width=16, layers=1, heads=2, delta=True)
    torch.nn.init.zeros_(d.out.weight)
    torch.nn.init.zeros_(d.out.bias)
    torch.testing.assert_close(d(z), z[:, -1:].expand(-1, 3, -1))
    # with the same weights, delta mode is the plain prediction plus z_t
    d.load_state_dict(p.state_dict())
    torch.testing.assert_close(d(z), p(z) + z[:, -1:], rtol=0, atol=1e-6)
    # a zero output layer predicts its bias, whatever the history
    torch.nn.init.zeros_(d.out.weight)
    d.delta = False
    torch.testing.assert_close(d(z), d.out.bias.expand(2, 3, 8))
    # each sample's prediction is its own: a batch of 2 gives what each sample gives alone
    torch.testing.assert_close(p(z)[1:], p(z[1:]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expects 4 history"):
        p(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="built without a context input"):
        p(z, torch.randn(2, 16))
    c = Prophet(latent_dim=8, history=4, future=3, width=16, layers=1, heads=2, context_dim=12)
    with pytest.raises(ValueError, match="built with a context input"):
        c(z)
    context = torch.randn(2, 12)
    assert not torch.allclose(c(z, context), c(z, context + 1.0))  # the context reaches the prediction


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
    # closed form: d out / d gate = (1 - tanh(0)^2) attn = attn and dL/d out = 2 out = 2 act, so the gate's
    # gradient is <2 act, attn> with attn = CrossAttn(LN(act), proj(memory))
    with torch.no_grad():
        kv = inj.memory_proj(memory)
        attn, _ = inj.attn(inj.norm(act), kv, kv, need_weights=False)
        expected = (2 * act * attn).sum()
    assert expected.abs().item() > 1e-3
    assert inj.gate.grad.item() == pytest.approx(expected.item(), rel=1e-5)
    # at gate 0 the attention weights get no gradient yet; they start learning once the gate opens
    assert inj.attn.in_proj_weight.grad.abs().max().item() == 0.0
    with torch.no_grad():
        inj.gate.fill_(0.5)
        torch.testing.assert_close(inj(act, memory), act + math.tanh(0.5) * attn)
    assert inj.gate_value == pytest.approx(math.tanh(0.5))


def test_alignment_loss_is_one_minus_the_cosine_of_the_projected_fut_states():
    torch.manual_seed(0)
    al = FutureAlignment(hidden_size=16, latent_dim=8, layer=1)
    fut_h, z_future = torch.randn(2, 3, 16), torch.randn(2, 4, 8)
    valid = torch.tensor([[True, True, False, True], [True, False, True, True]])
    loss, cos = al.loss(fut_h, z_future, valid)
    # independent computation: cosine of MLP(fut_h) with the first M=3 future latents, over their valid steps
    per_step = torch.nn.functional.cosine_similarity(al.mlp(fut_h), z_future[:, :3], dim=-1)
    expected = per_step[valid[:, :3]].mean()
    assert cos.item() == pytest.approx(expected.item(), abs=1e-6)
    assert loss.item() == pytest.approx(1 - expected.item(), abs=1e-6)
    changed = z_future.clone()
    changed[:, 3] = 100.0  # beyond the M FUT tokens
    changed[0, 2] = -changed[0, 2]  # masked out
    assert al.loss(fut_h, changed, valid)[0].item() == pytest.approx(loss.item(), abs=1e-6)
    target = torch.cat([al.mlp(fut_h).detach() * 3.0, z_future[:, 3:]], dim=1)  # same directions: cos 1
    loss0, cos0 = al.loss(fut_h, target, valid)
    assert loss0.item() == pytest.approx(0.0, abs=1e-6) and cos0.item() == pytest.approx(1.0, abs=1e-6)


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


def test_token_rows_are_the_plain_lookup_and_their_gradient_is_deterministic():
    """The rows of the added tokens replace exactly the embeddings at their positions, and their gradient (summed
    over many positions of long sequences, like E4's CoC prompts) is the same bits on every call: the CPU
    index-put accumulation it replaced changed the last bits from run to run."""
    from fplus.model.token_rows import TokenRows

    g = torch.Generator().manual_seed(0)
    ids = [500, 501, 502]
    rows = TokenRows(ids, torch.randn(3, 16, generator=g))
    input_ids = torch.randint(0, 400, (8, 4096), generator=g)
    input_ids[:, ::7] = 500
    input_ids[:, 3::11] = 502
    embeds = torch.randn(8, 4096, 16, generator=g)
    out = rows.apply(input_ids, embeds)
    at = {i: input_ids == i for i in ids}
    assert torch.equal(out[at[500]], rows.weight[0].expand(int(at[500].sum()), 16))
    assert torch.equal(out[at[502]], rows.weight[2].expand(int(at[502].sum()), 16))
    other = ~(at[500] | at[502])
    assert torch.equal(out[other], embeds[other])
    upstream = torch.randn(8, 4096, 16, generator=g)
    grads = []
    for _ in range(5):
        rows.weight.grad = None
        (rows.apply(input_ids, embeds) * upstream).sum().backward()
        grads.append(rows.weight.grad.clone())
    assert all(torch.equal(grads[0], gr) for gr in grads[1:])
    expected = torch.stack([upstream[at[i]].double().sum(0) for i in ids]).float()
    torch.testing.assert_close(grads[0], expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(grads[0][1], torch.zeros(16))  # a token absent from the batch gets no gradient
