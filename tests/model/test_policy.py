"""The F+ policy's contracts (DESIGN 5): do-no-harm, CoC causality, gate gradient, corruption, save/load."""

import numpy as np
import pytest
import torch

from fplus import batch as K
from fplus.errors import FplusError
from fplus.model.corruption import MODES
from fplus.model.policy import FPlusPolicy
from tests.helpers import policy_config

STATS = {"action": {"mean": np.array([0.5, -0.5, 0.0, 1.0]), "std": np.array([2.0, 1.0, 0.5, 1.0])},
         "observation.state": {"mean": np.zeros(4), "std": np.ones(4)}}
B, H, D = 4, 6, 32


def make(seed=0, **flags) -> FPlusPolicy:
    config = policy_config(backbone="tiny", action_dim=4, action_horizon=H, image_size=64, state_dim=4,
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


EXPERIMENT_FLAGS = {
    "E1": dict(prophet=True),
    "E2": dict(prophet=True, injection=True),
    "E3": dict(coc=True),
    "E4": dict(prophet=True, injection=True, coc=True, flare_align=True),
}


@pytest.mark.parametrize("experiment", list(EXPERIMENT_FLAGS))
def test_do_no_harm_every_experiment_starts_as_e0_bit_for_bit(experiment):
    """Same INIT_SEED, nothing copied: shared modules start identical and the actions equal E0's exactly."""
    e0 = make()
    other = make(seed=123, **EXPERIMENT_FLAGS[experiment])  # a different global seed changes nothing
    shared = {k: v for k, v in e0.state_dict().items() if not k.startswith(("vlm.", "token_rows."))}
    theirs = other.state_dict()
    for key, value in shared.items():
        assert torch.equal(value, theirs[key]), key
    for token_id in e0.token_rows.ids.tolist():  # the ACT and STATE rows, whatever other tokens E4 adds
        token = e0.backbone.tokenizer.convert_ids_to_tokens(token_id)
        theirs_id = other.backbone.tokenizer.convert_tokens_to_ids(token)
        assert torch.equal(e0.token_rows.row(token_id), other.token_rows.row(theirs_id)), token
    batch = make_batch()
    a0 = e0.predict_action_chunk(e0.processor(batch))
    assert a0.shape == (B, H, 4)
    assert torch.equal(other.predict_action_chunk(other.processor(batch)), a0)
    if other.injection is not None:  # with the gate at 0 no corruption reaches the actions
        for mode in MODES:
            shuffled = other.processor({**batch, "episode_index": [0, 1, 2, 3]})
            assert torch.equal(other.predict_action_chunk(shuffled, mode), a0)


def test_joint_coc_puts_no_text_loss_on_any_act_position():
    policy = make(coc=True).train()
    batch = make_batch()
    enc = policy.encode(policy.processor(batch, with_coc=True), with_coc=True)
    assert enc.prompt.labels is not None
    captured = {}

    def keep(grad):
        captured["g"] = grad

    # the text loss recomputed from a leaf copy of the final hidden states: its gradient per position
    last = enc.out.last_hidden.detach().requires_grad_(True)
    last.register_hook(keep)
    from fplus.model.backbone import lm_loss

    lm_loss(policy.vlm.get_output_embeddings(), last, enc.prompt.labels).backward()
    grad_at_act = enc.prompt.gather(captured["g"], enc.prompt.act_positions)
    assert grad_at_act.abs().max().item() == 0.0
    # the separator right after the queries does carry it (it predicts the first CoC token)
    sep = enc.prompt.act_positions[:, -1] + 1
    assert captured["g"][torch.arange(B), sep].abs().sum(-1).min().item() > 0


def test_coc_suffix_leaves_act_states_and_actions_unchanged():
    policy = make(coc=True)
    batch = make_batch()
    with_coc = policy.processor.builder(batch[K.IMAGES], batch[K.INSTRUCTIONS], batch[K.COC_TEXT])
    without = policy.processor.builder(batch[K.IMAGES], batch[K.INSTRUCTIONS])
    assert with_coc.labels is not None and with_coc.input_ids.shape[1] > without.input_ids.shape[1]
    h_with = policy.encode({**batch, "prompt": with_coc}, True).act_h
    h_without = policy.encode({**batch, "prompt": without}, False).act_h
    # different sequence lengths change the CPU kernels' blocking: equal up to float rounding ...
    torch.testing.assert_close(h_with, h_without, rtol=1e-5, atol=1e-5)
    # ... and bit for bit when only the tokens after the ACT tokens differ (same padded length)
    padded = policy.processor.builder(batch[K.IMAGES], batch[K.INSTRUCTIONS], pad_to=with_coc.input_ids.shape[1])
    assert torch.equal(policy.encode({**batch, "prompt": padded}, False).act_h, h_with)
    loss, metrics = policy(policy.processor(batch, with_coc=True))
    metrics = {k: float(v) for k, v in metrics.items()}  # 0-d tensors -> numbers
    assert metrics["l_text"] > 0 and torch.isfinite(loss)
    # l_text is the next-token cross-entropy of the labelled (CoC) tokens, from the full logits
    enc = policy.encode(policy.processor(batch, with_coc=True), with_coc=True)
    logits = policy.vlm.get_output_embeddings()(enc.out.last_hidden[:, :-1]).float()
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), enc.prompt.labels[:, 1:].flatten(),
                                                 ignore_index=-100)
    assert metrics["l_text"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["loss"] == pytest.approx(metrics["l_action"] + 0.1 * metrics["l_text"], rel=1e-6)


def test_gate_gets_gradient_once_the_action_loss_depends_on_memory():
    policy = make(prophet=True, injection=True).train()
    loss, metrics = policy(policy.processor(make_batch(), with_coc=True), p_oracle=0.5)
    metrics = {k: float(v) for k, v in metrics.items()}  # 0-d tensors -> numbers
    loss.backward()
    assert metrics["gate"] == 0.0
    assert policy.injection.gate.grad is not None and policy.injection.gate.grad.abs().item() > 0
    assert policy.prophet.out.weight.grad.abs().sum() > 0


def test_e1_world_loss_reaches_the_backbone_and_changes_the_actions():
    """E1 is not E0 with a detached side model: L_world trains backbone weights through the Prophet's context."""
    e1 = make(prophet=True).train()
    terms, _ = e1.losses(e1.processor(make_batch(), with_coc=True))
    terms["l_world"].backward()
    q = dict(e1.vlm.named_parameters())["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert e1.token_rows.weight.grad.abs().sum() > 0 and e1.action_head.mlp[1].weight.grad is None
    # a few steps without gradient clipping: E1's actions move away from E0's
    e0 = make().train()
    batch = make_batch()
    for policy in (e0, e1):
        policy.zero_grad(set_to_none=True)
        opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.05)
        for _ in range(3):
            opt.zero_grad()
            policy(policy.processor(batch, with_coc=True))[0].backward()
            opt.step()
    e0.eval()
    e1.eval()
    prepared = e0.processor(batch)
    diff = (e0.predict_action_chunk(prepared) - e1.predict_action_chunk(prepared)).abs().max().item()
    assert diff > 1e-4


def test_latents_are_standardised_inside_the_policy():
    e2 = make(prophet=True, injection=True)
    mean, std = torch.linspace(-3, 3, D), torch.linspace(0.01, 2.0, D)
    e2.set_latent_stats(mean, std)
    batch = make_batch()
    enc = e2.encode(e2.processor(batch), with_coc=False)
    torch.testing.assert_close(enc.z_hist, (batch[K.Z_HIST] - mean) / std)
    torch.testing.assert_close(enc.z_future, (batch[K.Z_FUTURE] - mean) / std)
    # a near-constant raw latent (the audited demo case) becomes a spread-out one
    raw = mean + 0.001 * torch.randn(100, D)
    e2.set_latent_stats(raw.mean(0), raw.std(0))
    z = e2.standardize(raw)
    torch.testing.assert_close(z.mean(0), torch.zeros(D), atol=2e-3, rtol=0)  # float32 of a value near 3
    torch.testing.assert_close(z.std(0), torch.ones(D), atol=2e-3, rtol=0)


def test_corruption_modes_change_the_memory_and_leave_e0_unaffected():
    e2 = make(prophet=True, injection=True)
    open_gate(e2)
    batch = {**make_batch(), "episode_index": [0, 1, 2, 3]}
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    actions = {mode: e2.predict_action_chunk(e2.processor(batch), corruption=mode, generator=g()) for mode in MODES}
    for mode in ("zero", "random", "shuffle", "oracle", "history"):
        assert not torch.allclose(actions[mode], actions["none"]), mode
    # one backbone pass for every mode gives the same actions as one pass per mode
    together, _ = e2.predict_modes(e2.processor(batch), MODES, {m: g() for m in MODES})
    for mode in MODES:
        torch.testing.assert_close(together[mode], actions[mode], rtol=1e-5, atol=1e-6)
    # shuffle = the memories of other samples: shuffling a batch of identical samples changes nothing
    same = {k: (v[:1].expand(B, *v.shape[1:]).clone() if torch.is_tensor(v) else [v[0]] * B)
            for k, v in batch.items()}
    same["episode_index"] = [0, 1, 2, 3]
    a_same = e2.predict_action_chunk(e2.processor(same))
    torch.testing.assert_close(e2.predict_action_chunk(e2.processor(same), corruption="shuffle", generator=g()), a_same)
    # oracle = the true future: the same as injecting z_future through the training path
    loss_oracle, _ = e2(e2.processor(batch, with_coc=True), corruption="oracle")
    loss_p1, _ = e2(e2.processor(batch, with_coc=True), p_oracle=1.0)
    assert loss_oracle.item() == pytest.approx(loss_p1.item(), rel=1e-6)
    # history = z_t repeated: the same as giving z_t as every future latent to the oracle path
    z_t = batch[K.Z_HIST][:, -1:].expand(-1, 4, -1)
    torch.testing.assert_close(actions["history"],
                               e2.predict_action_chunk(e2.processor({**batch, K.Z_FUTURE: z_t}), corruption="oracle"))
    # shuffle without episodes of other samples is refused, never silently a same-episode memory
    with pytest.raises(FplusError, match="at least two episodes"):
        e2.predict_action_chunk(e2.processor({**batch, "episode_index": [7] * B}), corruption="shuffle")
    e0 = make()
    a0 = e0.predict_action_chunk(e0.processor(batch))
    for mode in MODES:
        assert torch.equal(e0.predict_action_chunk(e0.processor(batch), corruption=mode, generator=g()), a0)


def test_every_loss_term_of_e4():
    policy = make(prophet=True, injection=True, coc=True, flare_align=True).train()
    loss, m = policy(policy.processor(make_batch(), with_coc=True), p_oracle=0.9)
    m = {k: float(v) for k, v in m.items()}  # 0-d tensors -> numbers
    assert set(m) == {"loss", "l_action", "l_world", "cos_world", "gate", "l_text", "l_align", "cos_align"}
    assert m["gate"] == 0.0
    expected = m["l_action"] + 1.0 * m["l_world"] + 0.1 * m["l_text"] + 0.5 * m["l_align"]
    assert m["loss"] == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert policy.align.mlp[1].weight.grad.abs().sum() > 0


def test_coc_fraction_split_passes_give_the_one_padded_pass_losses_and_gradients():
    """COC_FRACTION in joint mode runs the CoC rows and the others as two passes (no row padded to a CoC row's
    length): every loss term and every gradient equal one pass over all rows padded together (float tolerance)."""
    batch = make_batch()

    def run(split: bool):
        policy = make(prophet=True, injection=True, coc=True, flare_align=True).train()
        open_gate(policy)  # the memory reaches the actions, so its gradients are compared too
        processed = policy.processor(batch, with_coc=True, coc_fraction=0.5)
        if not split:  # the same prompts as ONE batch: rows 2, 3 without CoC, padded to the CoC rows' length
            builder = policy.processor.builder
            cameras = builder._cameras(batch[K.IMAGES])
            whole = builder._build(builder._pixels(cameras), 1, batch[K.INSTRUCTIONS],
                                   [*batch[K.COC_TEXT][:2], None, None], with_queries=True)
            assert whole.rest is None and whole.input_ids.shape[1] > processed[K.PROMPT].rest.input_ids.shape[1]
            processed = {**processed, K.PROMPT: whole}
        else:
            assert [len(p.input_ids) for p in processed[K.PROMPT].parts] == [2, 2]
        loss, metrics = policy(processed, p_oracle=0.5, generator=torch.Generator().manual_seed(0))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return {k: float(v) for k, v in metrics.items()}, grads

    (m_split, g_split), (m_one, g_one) = run(True), run(False)
    assert set(m_split) == set(m_one) and m_split["l_text"] > 0
    for key in m_one:
        assert m_split[key] == pytest.approx(m_one[key], rel=1e-5, abs=1e-7), key
    assert set(g_split) == set(g_one) and len(g_one) > 20
    for name, grad in g_one.items():
        torch.testing.assert_close(g_split[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_coc_separate_mode_runs_its_own_pass():
    policy = make(coc=True, coc_mode="separate")
    batch = make_batch()
    prompt = policy.processor.builder(batch[K.IMAGES], batch[K.INSTRUCTIONS], batch[K.COC_TEXT])
    assert prompt.labels is None and prompt.coc is not None
    _, metrics = policy(policy.processor(batch, with_coc=True))
    metrics = {k: float(v) for k, v in metrics.items()}  # 0-d tensors -> numbers
    assert metrics["l_text"] > 0
    # the CoC pass is separate: the action loss is E0's bit for bit, the total adds lambda_text * l_text
    e0 = make()
    _, m0 = e0(e0.processor(batch, with_coc=True))
    m0 = {k: float(v) for k, v in m0.items()}  # 0-d tensors -> numbers
    assert metrics["l_action"] == m0["l_action"]
    assert metrics["loss"] == pytest.approx(m0["loss"] + 0.1 * metrics["l_text"], rel=1e-6)


def test_missing_coc_text_is_an_error():
    policy = make(coc=True)
    with pytest.raises(FplusError, match="no coc_text"):
        policy.processor(make_batch(coc=False), with_coc=True)
    with pytest.raises(FplusError, match="the batch's prompt has no CoC text"):  # a prompt built without it
        policy(policy.processor(make_batch(coc=False)))


def test_padded_action_steps_do_not_count():
    policy = make()
    batch = make_batch()
    loss, _ = policy(policy.processor(batch, with_coc=True))
    batch[K.ACTIONS][1, -2:] = 1e4  # padded steps of sample 1
    assert policy(policy.processor(batch, with_coc=True))[0].item() == pytest.approx(loss.item(), rel=1e-6)


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
    before = policy.predict_action_chunk(policy.processor(batch))
    policy.save(tmp_path / "policy")
    loaded = FPlusPolicy.load(tmp_path / "policy").eval()
    assert torch.equal(loaded.predict_action_chunk(loaded.processor(batch)), before)
    assert torch.equal(loaded.latent_norm.scale, policy.latent_norm.scale)
    assert torch.equal(loaded.token_rows.weight, policy.token_rows.weight)
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
    batch = plain.processor(make_batch(), with_coc=True)
    la, _ = plain(batch)
    lb, _ = ckpt(batch)
    la.backward()
    lb.backward()
    assert la.item() == pytest.approx(lb.item(), rel=1e-6)
    ga = dict(plain.vlm.named_parameters())["model.language_model.layers.0.self_attn.q_proj.weight"].grad
    gb = dict(ckpt.vlm.named_parameters())["model.language_model.layers.0.self_attn.q_proj.weight"].grad
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
