import numpy as np
import pytest
import torch

from fplus.errors import ConfigError
from fplus.model.backbone import ALIASES, load_backbone, resolve_name, save_backbone, token_seed
from fplus.model.chat import IMAGE_PAD, QWEN_SPECIAL_TOKENS, VIDEO_PAD, VISION_END, VISION_START
from fplus.model.prompt import PromptBuilder
from fplus.model.tiny import build_tiny, build_tiny_tokenizer

H, M = 8, 4


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny", action_horizon=H, num_fut_tokens=M, use_state=True)


def images(b, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (b, size, size, 3), dtype=np.uint8)


INSTRUCTIONS = ["pick up the red cup", "open the top drawer of the cabinet and put the bowl inside"]


def test_aliases_resolve_to_hub_ids():
    assert resolve_name("qwen3-vl-2b") == ALIASES["qwen3-vl-2b"] == "Qwen/Qwen3-VL-2B-Instruct"
    assert resolve_name("Qwen3_VL_4B") == "Qwen/Qwen3-VL-4B-Instruct"
    assert resolve_name("qwen3-vl-8b") == "Qwen/Qwen3-VL-8B-Instruct"
    assert resolve_name("qwen2.5-vl-3b") == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert resolve_name("someone/some-model") == "someone/some-model"
    assert resolve_name("Qwen/Qwen3-VL-30B-A3B-Instruct") == "Qwen/Qwen3-VL-30B-A3B-Instruct"  # not a "3B"
    assert resolve_name("tiny") == "tiny"


@pytest.mark.parametrize("name", ["qwen3_vl_3b_instruct", "qwen3-vl-3b", "Qwen/Qwen3-VL-3B-Instruct", "QWEN3VL3B"])
def test_qwen3_vl_3b_fails_naming_the_real_sizes(name):
    with pytest.raises(ConfigError) as err:
        resolve_name(name)
    message = str(err.value)
    assert "no 3B" in message and all(size in message for size in ("2B", "4B", "8B")) and "qwen2.5-vl-3b" in message


def test_unknown_name_and_offline_hub_fail_clearly():
    with pytest.raises(ConfigError, match="not an alias"):
        resolve_name("not a model")
    with pytest.raises(ConfigError, match="Did you mean 'qwen3-vl-4b'"):
        resolve_name("qwen3-vl-4")
    with pytest.raises(ConfigError, match="local directory.*tiny") as err:
        load_backbone("qwen3-vl-2b", action_horizon=H, num_fut_tokens=M, use_state=False)
    assert "'Qwen/Qwen3-VL-2B-Instruct'" in str(err.value) and "\n" not in str(err.value)


def test_special_tokens_added_and_embeddings_resized(backbone):
    tok = backbone.tokenizer
    assert tok.convert_ids_to_tokens(backbone.act_token_ids) == [f"<ACT_{i}>" for i in range(H)]
    assert tok.convert_ids_to_tokens(backbone.fut_token_ids) == [f"<FUT_{j}>" for j in range(M)]
    assert tok.convert_ids_to_tokens(backbone.state_token_id) == "<STATE>"
    new_ids = [*backbone.act_token_ids, *backbone.fut_token_ids, backbone.state_token_id]
    assert len(set(new_ids)) == H + M + 1
    emb = backbone.model.get_input_embeddings().weight
    assert emb.shape == (len(tok), backbone.hidden_size) and max(new_ids) < emb.shape[0]
    assert backbone.model.config.get_text_config().vocab_size == len(tok)
    # new rows: the mean of the old rows plus 0.1 x their std times noise seeded by the token's name
    rows = emb[new_ids]
    assert torch.isfinite(rows).all() and torch.cdist(rows, rows).add(torch.eye(len(new_ids))).min() > 0
    old = emb[: len(tok) - len(new_ids)].detach().double()
    mean, std = old.mean(0), old.var(0, unbiased=False).sqrt()
    names = tok.convert_ids_to_tokens(new_ids)
    noise = torch.stack([torch.randn(backbone.hidden_size, dtype=torch.float64,
                                     generator=torch.Generator().manual_seed(token_seed(t))) for t in names])
    torch.testing.assert_close(rows.detach(), (mean + 0.1 * std * noise).float())
    # one tokenisation of the ACT tokens, each a single id
    assert tok("<ACT_0><FUT_1><STATE>", add_special_tokens=False)["input_ids"] == [
        backbone.act_token_ids[0], backbone.fut_token_ids[1], backbone.state_token_id]


def test_tokens_not_added_twice_and_state_optional(tmp_path, backbone):
    save_backbone(backbone, tmp_path / "bb")
    again = load_backbone(str(tmp_path / "bb"), action_horizon=H + 2, num_fut_tokens=0, use_state=False)
    assert again.act_token_ids[:H] == backbone.act_token_ids and len(again.act_token_ids) == H + 2
    assert again.fut_token_ids == [] and again.state_token_id is None
    assert len(again.tokenizer) == len(backbone.tokenizer) + 2


def test_tiny_config_ids_match_the_tokenizer(backbone):
    cfg, tok = backbone.model.config, backbone.tokenizer
    assert cfg.image_token_id == tok.convert_tokens_to_ids(IMAGE_PAD)
    assert cfg.video_token_id == tok.convert_tokens_to_ids(VIDEO_PAD)
    assert cfg.vision_start_token_id == tok.convert_tokens_to_ids(VISION_START)
    assert cfg.vision_end_token_id == tok.convert_tokens_to_ids(VISION_END)
    assert tok.pad_token == "<|endoftext|>" and all(t in tok.get_vocab() for t in QWEN_SPECIAL_TOKENS)
    text = cfg.get_text_config()
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert int(cfg.vision_config.num_position_embeddings ** 0.5) ** 2 == cfg.vision_config.num_position_embeddings
    assert max(cfg.vision_config.deepstack_visual_indexes) < cfg.vision_config.depth
    assert (backbone.hidden_size, backbone.num_layers) == (64, 2)


def test_tiny_is_deterministic():
    (m1, t1, _), (m2, t2, _) = build_tiny(), build_tiny()
    assert t1.get_vocab() == t2.get_vocab()
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_save_load_round_trip_gives_identical_hidden_states(tmp_path, backbone):
    directory = save_backbone(backbone, tmp_path / "bb")
    loaded = load_backbone(str(directory), action_horizon=H, num_fut_tokens=M, use_state=True)
    assert loaded.source == str(directory) and type(loaded.model) is type(backbone.model)
    assert loaded.act_token_ids == backbone.act_token_ids and loaded.state_token_id == backbone.state_token_id
    assert loaded.tokenizer.get_vocab() == backbone.tokenizer.get_vocab()
    assert loaded.tokenizer.chat_template == backbone.tokenizer.chat_template
    a = PromptBuilder(backbone, 64, M, True, "joint_after_act")(images(2), INSTRUCTIONS, ["go left", "then up"])
    b = PromptBuilder(loaded, 64, M, True, "joint_after_act")(images(2), INSTRUCTIONS, ["go left", "then up"])
    for name in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    with torch.no_grad():
        out_a = backbone.forward(a, layers=(1,), text_loss=True)
        out_b = loaded.forward(b, layers=(1,), text_loss=True)
    assert torch.equal(out_a.last_hidden, out_b.last_hidden) and torch.equal(out_a.layers[1], out_b.layers[1])
    assert torch.equal(out_a.text_loss, out_b.text_loss)


def test_hidden_states_layers_and_text_loss(backbone):
    batch = PromptBuilder(backbone, 64, M, True, "joint_after_act")(images(2), INSTRUCTIONS, ["go left", "go up"])
    with torch.no_grad():
        last, layers = backbone.hidden_states(batch, layers=(1, -1))
        loss = backbone.text_loss(batch)
        reference = backbone.model(**{k: getattr(batch, k) for k in (
            "input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "labels")},
            use_cache=False)
    assert last.shape == (2, batch.input_ids.shape[1], backbone.hidden_size) and set(layers) == {1, -1}
    norm = backbone.model.model.language_model.norm
    torch.testing.assert_close(norm(layers[-1]), last, rtol=0, atol=0)
    assert not torch.equal(layers[1], layers[-1])
    torch.testing.assert_close(loss, reference.loss, rtol=1e-5, atol=1e-6)  # same loss as the HF LM head path
    with pytest.raises(ValueError, match="out of range"):
        backbone.hidden_states(batch, layers=(3,))


def test_state_embeds_add_to_the_state_input_and_get_gradient(backbone):
    builder = PromptBuilder(backbone, 64, M, True, None)
    batch = builder(images(2), INSTRUCTIONS)
    rows = torch.arange(2)
    state = torch.randn(2, backbone.hidden_size, requires_grad=True)
    captured = {}
    emb = backbone.model.get_input_embeddings()
    handle = backbone.model.model.language_model.layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        last, _ = backbone.hidden_states(batch, state_embeds=state)
    finally:
        handle.remove()
    x = captured["x"]
    state_row = emb(batch.input_ids[rows, batch.state_positions])
    torch.testing.assert_close(x[rows, batch.state_positions], state_row + state, rtol=0, atol=0)
    ids = batch.input_ids[:, 0]  # any text position keeps its embedding
    torch.testing.assert_close(x[:, 0], emb(ids))
    act = batch.gather(last, batch.act_positions)
    act.sum().backward()
    assert state.grad is not None and state.grad.abs().sum() > 0
    # the hook is gone after the call: the plain <STATE> embedding is back
    with torch.no_grad():
        plain, _ = backbone.hidden_states(batch)
        again, _ = backbone.hidden_states(batch, state_embeds=state)
    assert not torch.equal(plain, again) and torch.equal(again, last.detach())
    with pytest.raises(ValueError, match="no <STATE>"):
        backbone.hidden_states(PromptBuilder(backbone, 64, M, False, None)(images(2), INSTRUCTIONS), state_embeds=state)


def test_tiny_forward_backward_reaches_every_weight_deterministically(backbone):
    """A 4-image batch at 96 px: the backward reaches every weight (vision tower, deepstack merger, text layers,
    embeddings) with a finite non-zero gradient, and a second pass gives the same gradients bit for bit.
    (Its speed is measured in benchmarks/, not asserted here.)"""
    batch = PromptBuilder(backbone, 96, M, True, None)(images(4, 96), INSTRUCTIONS * 2)
    assert batch.image_grid_thw.tolist() == [[1, 6, 6]] * 4 and backbone.visual_tokens(96) == 9
    grads = []
    for _ in range(2):
        backbone.model.zero_grad(set_to_none=True)
        backbone.hidden_states(batch)[0].sum().backward()
        grads.append({n: p.grad.clone() for n, p in backbone.model.named_parameters() if p.grad is not None})
    backbone.model.zero_grad(set_to_none=True)
    names = [n for n, _ in backbone.model.named_parameters()]
    assert sorted(grads[0]) == sorted(names)
    assert any(n.startswith("model.visual.deepstack_merger_list") for n in names)
    for name, grad in grads[0].items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert torch.equal(grad, grads[1][name]), name


def test_qwen2_5_vl_directory_loads_with_its_own_class_and_patch_size(tmp_path):
    """A (tiny) Qwen2.5-VL saved locally goes through the same path: patch 14 x merge 2 -> 224 px gives 64 tokens."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tok = build_tiny_tokenizer()
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD), ("vision_start_token_id", VISION_START),
        ("vision_end_token_id", VISION_END)]}
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "bos_token_id": None, "eos_token_id": None,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                       "out_hidden_size": 64, "fullatt_block_indexes": [1], "window_size": 56},
        **ids)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(tmp_path)

    backbone = load_backbone(str(tmp_path), action_horizon=H, num_fut_tokens=M, use_state=True)
    assert type(backbone.model) is Qwen2_5_VLForConditionalGeneration and backbone.vision_factor == 28
    builder = PromptBuilder(backbone, 224, M, True, "joint_after_act")
    batch = builder(images(2, 100), INSTRUCTIONS, ["go left", "then up"])
    assert builder.tokens_per_image == 64 and batch.mm_token_type_ids.sum(1).tolist() == [64, 64]
    state = torch.zeros(2, backbone.hidden_size, requires_grad=True)
    out = backbone.forward(batch, layers=(1,), state_embeds=state, text_loss=True)
    (out.text_loss + batch.gather(out.last_hidden, batch.act_positions).sum()).backward()
    assert torch.isfinite(out.text_loss) and state.grad.abs().sum() > 0
    with torch.no_grad():  # a zero state changes nothing: the loss is the HF LM-head loss on the same batch
        reference = backbone.model(**{k: getattr(batch, k) for k in (
            "input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids", "labels")},
            use_cache=False)
    torch.testing.assert_close(out.text_loss.detach(), reference.loss, rtol=1e-5, atol=1e-6)
