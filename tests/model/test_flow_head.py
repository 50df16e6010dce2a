"""The flow-matching action head (ACTION_HEAD=flow) and the policy's chunk API around it: the loss and its draws,
Euler sampling, do-no-harm with the same noise, reproducible evaluation, RTC and the MSE head's prefix blend."""

import numpy as np
import pytest
import torch

from fplus import batch as K
from fplus.errors import FplusError
from fplus.model.action_head import masked_mse
from fplus.model.corruption import MODES
from fplus.model.flow_head import TAU_MAX, FlowActionHead, time_embedding
from fplus.model.policy import FPlusPolicy
from fplus.model.rtc import soft_mask
from tests.model.test_policy import EXPERIMENT_FLAGS, B, H, make, make_batch

A = 4


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_head(seed=0, **kw) -> tuple[FlowActionHead, torch.Tensor]:
    torch.manual_seed(seed)
    head = FlowActionHead(16, 3, 5, width=32, layers=2, heads=4, time_dim=16, **kw)
    return head, torch.randn(2, 5, 16)


# ----- the head ------------------------------------------------------------------------------------------------------


def test_time_embedding_tells_euler_steps_apart():
    emb = time_embedding(torch.linspace(0, 1, 11), 64)
    assert emb.shape == (11, 64)
    dist = torch.cdist(emb, emb) + torch.eye(11) * 1e9
    assert dist.min() > 0.5


def test_velocity_is_differentiable_in_x():
    head, act_h = small_head()
    head = head.double()
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda x: head.velocity(act_h.double(), x, 0.3).double()  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)
    (jac,) = torch.autograd.grad(fn(x)[:, 0].sum(), x)  # step 0's velocity reads the other steps too (attention)
    assert jac[:, 1:].abs().sum() > 0


def test_loss_is_masked_mse_to_the_straight_line_velocity():
    head, act_h = small_head()
    target, pad = torch.randn(2, 5, 3), torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    tau, noise = head.draw(2, gen(3))
    x_tau = tau[:, None, None] * target + (1 - tau[:, None, None]) * noise  # tau = 0 noise, 1 data
    expected = masked_mse(head.velocity(act_h, x_tau, tau, pad), target - noise, pad)
    assert torch.equal(head.loss(act_h, target, pad, tau, noise), expected)
    # the draws come from the generator: the same seed, the same loss; padded targets change nothing at all
    assert torch.equal(head.loss(act_h, target, pad, generator=gen(3)), expected)
    moved = target.clone()
    moved[1, 3:] = 1e4
    assert torch.equal(head.loss(act_h, moved, pad, generator=gen(3)), expected)


def test_tau_distributions():
    beta, _ = small_head()
    uniform, _ = small_head(tau_sampling="uniform")
    tb, _ = beta.draw(20000, gen(0))
    tu, _ = uniform.draw(20000, gen(0))
    assert 0 <= tb.min() and tb.max() <= TAU_MAX and 0 <= tu.min() and tu.max() < 1
    # pi0: tau = 0.999 (1 - u), u ~ Beta(1.5, 1): E[tau] = 0.999 * 0.4 and P(tau < 0.5) = 1 - (1 - 0.5/0.999)^1.5
    assert tb.mean().item() == pytest.approx(0.999 * 0.4, abs=0.01)
    assert (tb < 0.5).float().mean().item() == pytest.approx(1 - (1 - 0.5 / 0.999) ** 1.5, abs=0.01)
    assert tu.mean().item() == pytest.approx(0.5, abs=0.01)


def test_sample_is_euler_from_noise():
    head, act_h = small_head()
    noise = torch.randn(2, 5, 3)
    assert torch.equal(head.sample(act_h, noise, 1), noise + head.velocity(act_h, noise, 0.0))
    x = noise
    for k in range(4):
        x = x + 0.25 * head.velocity(act_h, x, k / 4)
    assert torch.equal(head.sample(act_h, noise, 4), x)


def test_a_flow_head_fits_a_chunk():
    """Overfit two conditions -> two chunks: sampling from fresh noise lands on the right chunk."""
    head, act_h = small_head()
    target = torch.randn(2, 5, 3)
    pad = torch.zeros(32, 5, dtype=torch.bool)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    g = gen(0)
    for _ in range(300):  # 16 (tau, noise) draws per condition and step
        opt.zero_grad()
        head.loss(act_h.repeat(16, 1, 1), target.repeat(16, 1, 1), pad, generator=g).backward()
        opt.step()
    with torch.no_grad():
        sampled = head.sample(act_h, torch.randn(2, 5, 3, generator=gen(9)), 10)
    assert (sampled - target).abs().mean() < 0.1 * target.abs().mean()  # measured 0.053


# ----- the policy -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", list(EXPERIMENT_FLAGS))
def test_flow_do_no_harm_every_experiment_samples_e0s_chunk_bit_for_bit(experiment):
    """With ACTION_HEAD=flow and the same noise generator, every experiment at init gives E0's actions exactly,
    under every corruption mode (the noise is drawn before any corruption draw), and the same training loss."""
    e0 = make(action_head="flow")
    other = make(seed=123, action_head="flow", **EXPERIMENT_FLAGS[experiment])
    shared = {k: v for k, v in e0.state_dict().items() if not k.startswith(("vlm.", "token_rows."))}
    theirs = other.state_dict()
    assert any(k.startswith("action_head.blocks.") for k in shared)
    for key, value in shared.items():
        assert torch.equal(value, theirs[key]), key
    batch = {**make_batch(), "episode_index": [0, 1, 2, 3]}
    a0 = e0.predict_action_chunk(e0.processor(batch), generator=gen(5))
    assert a0.shape == (B, H, A)
    modes = MODES if other.injection is not None else ("none",)
    for mode in modes:
        assert torch.equal(other.predict_action_chunk(other.processor(batch), mode, generator=gen(5)), a0), mode
    prefix = a0[:, 2:] + 0.1
    rtc0 = e0.predict_action_chunk(e0.processor(batch), generator=gen(5), prefix=prefix, inference_delay=1)
    assert torch.equal(other.predict_action_chunk(other.processor(batch), generator=gen(5), prefix=prefix,
                                                  inference_delay=1), rtc0)
    if experiment == "E2":  # tau and noise are drawn before the scheduled-sampling draw
        train = e0.processor(make_batch(), with_coc=True)
        l0 = e0.train()(train, generator=gen(7))[1]["l_action"]
        assert other.train()(other.processor(make_batch(), with_coc=True), p_oracle=0.5,
                             generator=gen(7))[1]["l_action"] == l0


def test_flow_and_mse_policies_share_everything_but_the_head():
    mse, flow = make(), make(action_head="flow")
    assert mse.config.model.action_head == "mse" and flow.config.model.action_head == "flow"
    assert isinstance(flow.action_head, FlowActionHead)
    ours = {k: v for k, v in mse.state_dict().items() if not k.startswith("action_head.")}
    theirs = flow.state_dict()
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    batch = make_batch()
    enc_mse, enc_flow = mse.encode(mse.processor(batch), False), flow.encode(flow.processor(batch), False)
    assert torch.equal(enc_mse.act_h, enc_flow.act_h)


def test_flow_noise_is_the_generators():
    policy = make(action_head="flow")
    batch = policy.processor(make_batch())
    a = policy.predict_action_chunk(batch, generator=gen(1))
    assert torch.equal(policy.predict_action_chunk(batch, generator=gen(1)), a)
    assert not torch.allclose(policy.predict_action_chunk(batch, generator=gen(2)), a)
    noise = torch.randn(B, H, A, generator=gen(1))  # the same noise given directly, or from a `noise` generator
    assert torch.equal(policy.predict_action_chunk(batch, noise=noise), a)
    assert torch.equal(policy.predict_action_chunk(batch, generator=gen(9), noise=gen(1)), a)
    together, _ = policy.predict_modes(batch, ["none"], noise=gen(1))
    assert torch.equal(together["none"], a)
    with pytest.raises(FplusError, match="flow noise of shape"):
        policy.predict_action_chunk(batch, noise=noise[:, :2])
    # training: the same generator gives the same loss (exact resume), padded steps do not count
    policy.train()
    loss = policy(policy.processor(make_batch(), with_coc=True), generator=gen(4))[0]
    moved = make_batch()
    moved[K.ACTIONS][1, -2:] = 1e4  # the padded steps of sample 1
    assert policy(policy.processor(moved, with_coc=True), generator=gen(4))[0].item() == loss.item()
    assert policy(policy.processor(make_batch(), with_coc=True), generator=gen(5))[0].item() != loss.item()


def test_rtc_through_predict():
    """The previous chunk's prefix (raw): the returned first d actions are the prefix bit for bit; the sampler itself
    comes close on them (guidance), and the overlap follows the prefix more than an unguided chunk does."""
    policy = make(action_head="flow")
    batch = policy.processor(make_batch())
    previous = policy.predict_action_chunk(batch, generator=gen(1))
    d, s = 2, 2
    prefix = previous[:, s:]  # P = H - s = 4 actions of the previous chunk still to run, step s.. of it
    out = policy.predict(batch, generator=gen(2), prefix=prefix, inference_delay=d).actions
    assert torch.equal(out[:, :d], prefix[:, :d])
    plain = policy.predict_action_chunk(batch, generator=gen(2))
    # what the sampler gives before the overwrite (normalised space, where the guidance works)
    enc = policy.encode(batch, False)
    plan = policy.chunk_prefix(prefix, d)
    assert torch.equal(plan.weights, soft_mask(H, d, H - 4).to(plan.weights))
    guided = policy.act(enc.act_h, None, policy.noise(B, gen(2)), plan)
    norm_plain, target = policy.action_norm(plain), plan.normalised
    err_guided = (guided[:, :d] - target[:, :d]).abs()
    err_plain = (norm_plain[:, :d] - target[:, :d]).abs()
    # measured (normalised units, data std ~1): max 0.13, mean 0.038 = 0.031 x the unguided chunk's 1.23
    assert err_guided.max() < 0.25 and err_guided.mean() < 0.06 * err_plain.mean()
    assert torch.equal(policy.action_norm.inverse(guided)[:, d:], out[:, d:])
    overlap = slice(d, H - s)
    # the soft-masked overlap follows the prefix too (measured 0.47 vs 0.91 normalised), less than the frozen steps
    err = lambda a: (policy.action_norm(a)[:, overlap] - target[:, overlap]).abs().mean()  # noqa: E731
    assert err(out) < 0.7 * err(plain)
    # d = 0 and nothing overlapping (s = H): plain sampling bit for bit
    assert torch.equal(policy.predict_action_chunk(batch, generator=gen(2), prefix=prefix[:, :0],
                                                   execution_horizon=H), plain)


def test_mse_prefix_blend_through_predict():
    policy = make()
    assert policy.config.model.action_head == "mse"
    batch = policy.processor(make_batch())
    plain = policy.predict_action_chunk(batch)
    prefix = torch.randn(B, 5, A, generator=gen(0))
    d, s = 2, 3  # overlap H - s = 3 < P = 5: the prefix's last 2 actions are not used
    out = policy.predict_action_chunk(batch, prefix=prefix, inference_delay=d, execution_horizon=s)
    w = soft_mask(H, d, s)[:5, None]
    assert torch.equal(out[:, :d], prefix[:, :d])
    assert torch.equal(out[:, d:H - s], (w * prefix + (1 - w) * plain[:, :5])[:, d:H - s])
    assert torch.equal(out[:, H - s:], plain[:, H - s:])


@pytest.mark.parametrize("kwargs,match", [
    (dict(prefix=torch.zeros(B, 3, A), inference_delay=4), "inference_delay"),
    (dict(prefix=torch.zeros(B, H + 1, A)), "inference_delay"),
    (dict(prefix=torch.zeros(B, 3, A + 1)), "raw actions"),
    (dict(prefix=torch.zeros(B, 3, A), execution_horizon=2), "execution_horizon"),  # overlap 4 > P = 3
])
def test_bad_prefixes_are_refused(kwargs, match):
    policy = make(action_head="flow")
    with pytest.raises(FplusError, match=match):
        policy.predict(policy.processor(make_batch()), **kwargs)


def test_flow_policy_save_load_round_trip(tmp_path):
    policy = make(action_head="flow", flow_steps=3, flow_width=32, flow_heads=2, flow_tau="uniform")
    with torch.no_grad():
        for p in policy.action_head.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = make_batch()
    before = policy.predict_action_chunk(policy.processor(batch), generator=gen(3))
    policy.save(tmp_path / "policy")
    loaded = FPlusPolicy.load(tmp_path / "policy").eval()
    assert loaded.config.model.action_head == "flow" and loaded.config.model.flow_steps == 3
    assert torch.equal(loaded.predict_action_chunk(loaded.processor(batch), generator=gen(3)), before)


def test_flow_evaluation_repeats(tmp_path):
    """Offline evaluation / validation of a flow policy gives the same numbers every time (seeded noise)."""
    from fplus.data.lerobot import DataKeys
    from fplus.train.data import PolicySamples
    from fplus.train.validation import evaluate_modes
    from tests.helpers import CAM, policy_config, write_toy_dataset

    ds = write_toy_dataset(tmp_path / "ds", lengths=(8, 7))
    config = policy_config(backbone="tiny", action_dim=2, action_horizon=4, image_size=64, state_dim=2,
                           action_head="flow", flow_width=32, flow_heads=2)
    policy = FPlusPolicy.build(config, ds.stats, "action", "observation.state").eval()
    keys = DataKeys(image=CAM, state="observation.state", action="action", instruction="task")
    samples = PolicySamples(ds, keys, [0, 1], horizon=4, history=4, future=4)
    first = evaluate_modes(policy, samples, ("none",), batch_size=4, max_batches=2)
    assert first == evaluate_modes(policy, samples, ("none",), batch_size=4, max_batches=2)
    assert np.isfinite(first["modes"]["none"]["mse_norm"])
