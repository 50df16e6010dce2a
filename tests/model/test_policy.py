"""The F+ policy's contracts (DESIGN 5): do-no-harm, CoC causality, gate gradient, corruption, save/load."""

import numpy as np
import pytest
import torch

from fplus import batch as K
from fplus.errors import FplusError
from fplus.model.corruption import MODES
from fplus.model.policy import FPlusPolicy, PolicyConfig

STATS = {"action": {"mean": np.array([0.5, -0.5, 0.0, 1.0]), "std": np.array([2.0, 1.0, 0.5, 1.0])},
         "observation.state": {"mean": np.zeros(4), "std": np.ones(4)}}
B, H, D = 4, 6, 32


def make(seed=0, **flags) -> FPlusPolicy:
    config = PolicyConfig(backbone="tiny", action_dim=4, action_horizon=H, image_size=64, state_dim=4,
                          world_dim=D if (flags.get("prophet") or flags.get("flare_align")) else None, **flags)
    torch.manual_seed(seed)
    policy = FPlusPolicy.build(config, STATS, "action", "observation.state")
    return policy.eval()


def make_batch(seed=0, coc=True) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {
        K.IMAGES: torch.randint(0, 256, (B, 64, 64, 3), dtype=torch.uint8, generator=g),
        K.INSTRUCTIONS: ["push the puck to the goal", "open the drawer", "reach the red target", "press it"],
        K.STATE: torch.randn(B, 4, generator=g),
        K.ACTIONS: torch.randn(B, H, 4, generator=g),
        K.ACTION_PAD: torch.tensor([[False] * H, [False] * (H - 2) + [True] * 2, [False] * H, [False] * H]),
        K.Z_HIST: torch.randn(B, 4, D, generator=g),
        K.Z_FUTURE: torch.randn(B, 4, D, generator=g),
        K.FUTURE_VALID: torch.ones(B, 4, dtype=torch.bool),
    }
    if coc:
        batch[K.COC_TEXT] = ["approach the puck, because the goal needs it there", "grasp the handle and pull",
                             "move to the target", "press the button down firmly and release"]
    return batch


def open_gate(policy, value=0.8):
    with torch.no_grad():
        policy.injection.gate.fill_(value)


def test_do_no_harm_e2_equals_e0_with_the_gate_at_zero():
    e2 = make(prophet=True, injection=True)
    e0 = make(seed=1)
    missing, unexpected = e0.load_state_dict(e2.state_dict(), strict=False)
    assert not missing and all(k.startswith(("prophet.", "injection.", "latent_")) for k in unexpected)
    batch = make_batch()
    a0, a2 = e0.predict_action_chunk(batch), e2.predict_action_chunk(batch)
    assert a0.shape == (B, H, 4)
    assert torch.equal(a0, a2)
    for mode in MODES:  # with the gate at 0 no corruption reaches the actions
        assert torch.equal(e2.predict_action_chunk(batch, corruption=mode), a0)


def test_coc_suffix_leaves_act_states_and_actions_unchanged():
    policy = make(coc=True)
    batch = make_batch()
    with_coc = policy.builder(batch[K.IMAGES], batch[K.INSTRUCTIONS], batch[K.COC_TEXT])
    without = policy.builder(batch[K.IMAGES], batch[K.INSTRUCTIONS])
    assert with_coc.labels is not None and with_coc.input_ids.shape[1] > without.input_ids.shape[1]
    h_with, _, _ = policy._act_states(batch, with_coc)
    h_without, _, _ = policy._act_states(batch, without)
    # different sequence lengths change the CPU kernels' blocking: equal up to float rounding ...
    torch.testing.assert_close(h_with, h_without, rtol=1e-5, atol=1e-5)
    # ... and bit for bit when only the tokens after the ACT tokens differ (same padded length)
    padded = policy.builder(batch[K.IMAGES], batch[K.INSTRUCTIONS], pad_to=with_coc.input_ids.shape[1])
    assert torch.equal(policy._act_states(batch, padded)[0], h_with)
    loss, metrics = policy(batch)
    assert metrics["l_text"] > 0 and torch.isfinite(loss)


def test_gate_gets_gradient_once_the_action_loss_depends_on_memory():
    policy = make(prophet=True, injection=True).train()
    loss, metrics = policy(make_batch(), p_oracle=0.5)
    loss.backward()
    assert metrics["gate"] == 0.0
    assert policy.injection.gate.grad is not None and policy.injection.gate.grad.abs().item() > 0
    assert policy.prophet.out.weight.grad.abs().sum() > 0


def test_corruption_modes_change_the_memory_and_leave_e0_unaffected():
    e2 = make(prophet=True, injection=True)
    open_gate(e2)
    e2.set_latent_stats(torch.full((D,), 0.5), torch.full((D,), 2.0))
    batch = make_batch()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    actions = {mode: e2.predict_action_chunk(batch, corruption=mode, generator=g()) for mode in MODES}
    for mode in ("zero", "random", "shuffle", "oracle"):
        assert not torch.allclose(actions[mode], actions["none"]), mode
    # shuffle = the memories of other samples: shuffling a batch of identical samples changes nothing
    same = {k: (v[:1].expand(B, *v.shape[1:]).clone() if torch.is_tensor(v) else [v[0]] * B)
            for k, v in batch.items()}
    a_same = e2.predict_action_chunk(same)
    torch.testing.assert_close(e2.predict_action_chunk(same, corruption="shuffle", generator=g()), a_same)
    # oracle = the true future: the same as injecting z_future through the training path
    loss_oracle, _ = e2(batch, corruption="oracle")
    loss_p1, _ = e2(batch, p_oracle=1.0)
    assert loss_oracle.item() == pytest.approx(loss_p1.item(), rel=1e-6)
    e0 = make()
    a0 = e0.predict_action_chunk(batch)
    for mode in MODES:
        assert torch.equal(e0.predict_action_chunk(batch, corruption=mode, generator=g()), a0)


def test_every_loss_term_of_e4():
    policy = make(prophet=True, injection=True, coc=True, flare_align=True).train()
    loss, m = policy(make_batch(), p_oracle=0.9)
    assert set(m) == {"loss", "l_action", "l_world", "cos_world", "gate", "l_text", "l_align", "cos_align"}
    expected = m["l_action"] + 1.0 * m["l_world"] + 0.1 * m["l_text"] + 0.5 * m["l_align"]
    assert m["loss"] == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert policy.align.mlp[1].weight.grad.abs().sum() > 0


def test_coc_separate_mode_runs_its_own_pass():
    policy = make(coc=True, coc_mode="separate")
    batch = make_batch()
    prompt = policy.builder(batch[K.IMAGES], batch[K.INSTRUCTIONS], batch[K.COC_TEXT])
    assert prompt.labels is None and prompt.coc is not None
    _, metrics = policy(batch)
    assert metrics["l_text"] > 0


def test_missing_coc_text_is_an_error():
    with pytest.raises(FplusError, match="no coc_text"):
        make(coc=True)(make_batch(coc=False))


def test_padded_action_steps_do_not_count():
    policy = make()
    batch = make_batch()
    loss, _ = policy(batch)
    batch[K.ACTIONS][1, -2:] = 1e4  # padded steps of sample 1
    assert policy(batch)[0].item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("finetune", ["full", "lora", "frozen"])
def test_save_load_round_trip_gives_identical_actions(tmp_path, finetune):
    policy = make(prophet=True, injection=True, finetune=finetune, lora_layers=1)
    open_gate(policy, 0.3)
    with torch.no_grad():  # move every trainable weight away from its initial value (LoRA B starts at 0)
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    policy.set_latent_stats(torch.full((D,), 0.1), torch.full((D,), 3.0))
    batch = make_batch()
    before = policy.predict_action_chunk(batch)
    policy.save(tmp_path / "policy")
    loaded = FPlusPolicy.load(tmp_path / "policy").eval()
    assert torch.equal(loaded.predict_action_chunk(batch), before)
    assert torch.equal(loaded.latent_std, policy.latent_std)
    trainable = [n for n, p in loaded.vlm.named_parameters() if p.requires_grad]
    if finetune == "lora":
        assert trainable and all("lora_" in n for n in trainable)
    if finetune == "frozen":
        assert not trainable


def test_lora_trains_only_the_last_layers():
    policy = make(finetune="lora", lora_layers=1)
    names = [n for n, p in policy.vlm.named_parameters() if p.requires_grad]
    assert names and all("language_model.layers.1." in n for n in names)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    plain, ckpt = make(), make(gradient_checkpointing=True)
    assert ckpt.vlm.is_activation_checkpointing and not plain.vlm.is_activation_checkpointing
    ckpt.load_state_dict(plain.state_dict())
    plain.train()
    ckpt.train()
    batch = make_batch()
    la, _ = plain(batch)
    lb, _ = ckpt(batch)
    la.backward()
    lb.backward()
    assert la.item() == pytest.approx(lb.item(), rel=1e-6)
    ga = dict(plain.vlm.named_parameters())["model.language_model.layers.0.self_attn.q_proj.weight"].grad
    gb = dict(ckpt.vlm.named_parameters())["model.language_model.layers.0.self_attn.q_proj.weight"].grad
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
