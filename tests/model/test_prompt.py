from contextlib import contextmanager

import numpy as np
import pytest
import torch

from fplus.errors import FplusError
from fplus.model.backbone import load_backbone
from fplus.model.chat import IM_END
from fplus.model.prompt import IGNORE, PromptBatch, PromptBuilder

H, M = 8, 4
INSTRUCTIONS = ["pick up the red cup", "open the top drawer of the cabinet and put the bowl inside"]
COC = ["the gripper is above the cup, so lowering it closes the fingers around the handle",
       "because the drawer is closed, the arm must pull the handle first"]


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny", action_horizon=H, num_fut_tokens=M, use_state=True)


def images(b, size=64, seed=0, cameras=None):
    shape = (b, size, size, 3) if cameras is None else (b, cameras, size, size, 3)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@contextmanager
def attention(backbone, implementation):
    backbone.model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        backbone.model.set_attn_implementation("sdpa")


def valid_lengths(batch: PromptBatch) -> list[int]:
    return batch.attention_mask.sum(1).tolist()


def test_positions_point_at_the_query_tokens(backbone):
    batch = PromptBuilder(backbone, 64, M, True, None)(images(2), INSTRUCTIONS)
    rows = torch.arange(2)[:, None]
    assert batch.act_positions.shape == (2, H) and batch.fut_positions.shape == (2, M)
    assert batch.state_positions.shape == (2,)
    assert (batch.input_ids[rows, batch.act_positions] == torch.tensor(backbone.act_token_ids)).all()
    assert (batch.input_ids[rows, batch.fut_positions] == torch.tensor(backbone.fut_token_ids)).all()
    assert (batch.input_ids[torch.arange(2), batch.state_positions] == backbone.state_token_id).all()
    # <STATE> <ACT_0..H-1> <FUT_0..M-1> contiguous, ending the (unpadded) sequence: the FUT tokens come after the
    # ACT tokens, so under causal attention they cannot change the ACT states (do-no-harm for E4)
    order = torch.cat([batch.state_positions[:, None], batch.act_positions, batch.fut_positions], 1)
    assert (order.diff(dim=1) == 1).all()
    assert batch.fut_positions[:, -1].add(1).tolist() == valid_lengths(batch)
    assert batch.labels is None and batch.coc is None
    # without FUT and STATE
    plain = PromptBuilder(backbone, 64, 0, False, None)(images(2), INSTRUCTIONS)
    assert plain.fut_positions is None and plain.state_positions is None
    assert plain.input_ids.shape[1] == batch.input_ids.shape[1] - M - 1


def test_chat_template_and_right_padding(backbone):
    builder = PromptBuilder(backbone, 64, M, True, None)
    batch = builder(images(2), INSTRUCTIONS)
    tok = backbone.tokenizer
    n = backbone.visual_tokens(64)
    text = tok.decode(batch.input_ids[0, : valid_lengths(batch)[0]])
    expected = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>pick up the red cup"
                "<|im_end|>\n<|im_start|>assistant\n<STATE>" + "".join(f"<ACT_{i}>" for i in range(H))
                + "".join(f"<FUT_{j}>" for j in range(M)))
    assert text == expected
    lengths = valid_lengths(batch)
    assert lengths[0] < lengths[1] == batch.input_ids.shape[1]
    for i, length in enumerate(lengths):
        assert batch.attention_mask[i, :length].all() and not batch.attention_mask[i, length:].any()
        assert (batch.input_ids[i, length:] == tok.pad_token_id).all()
        assert (batch.input_ids[i, :length] != tok.pad_token_id).all()
    assert torch.equal(batch.mm_token_type_ids.bool(), batch.input_ids == backbone.model.config.image_token_id)
    assert batch.mm_token_type_ids.sum(1).tolist() == [n, n]
    assert builder.prompt_length(INSTRUCTIONS[0]) == lengths[0]


def test_labels_only_on_the_coc_text(backbone):
    batch = PromptBuilder(backbone, 64, M, True, "joint_after_act")(images(2), INSTRUCTIONS, COC)
    tok = backbone.tokenizer
    for i in range(2):
        labelled = batch.labels[i] != IGNORE
        sep = int(batch.fut_positions[i, -1]) + 1  # the separator follows the last query token, unlabelled
        assert batch.input_ids[i, sep] == tok("\n", add_special_tokens=False)["input_ids"][0]
        start = sep + 1
        end = valid_lengths(batch)[i]
        assert not labelled[:start].any() and labelled[start:end].all() and not labelled[end:].any()
        assert torch.equal(batch.labels[i, start:end], batch.input_ids[i, start:end])
        assert tok.decode(batch.labels[i, start:end]) == COC[i] + IM_END


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_coc_suffix_leaves_act_states_bit_identical(backbone, implementation):
    """THE causality test: a CoC suffix after the ACT tokens changes nothing at or before them.

    Right padding + causal attention: no position before the suffix attends to it, and the M-RoPE positions of the
    prefix are counted from the start over the unpadded tokens, so they do not depend on it either.
    """
    builder = PromptBuilder(backbone, 64, M, True, "joint_after_act")
    imgs = images(2)
    bare, coc = builder(imgs, INSTRUCTIONS), builder(imgs, INSTRUCTIONS, COC)
    assert coc.input_ids.shape[1] > bare.input_ids.shape[1] and len(set(valid_lengths(bare))) == 2
    for i, end in enumerate(bare.act_positions[:, -1].add(1).tolist()):
        assert torch.equal(bare.input_ids[i, :end], coc.input_ids[i, :end])
    # M-RoPE positions of the prefix are those of the bare prompt
    rope = backbone.model.model.get_rope_index
    pos_bare, _ = rope(bare.input_ids, bare.mm_token_type_ids, bare.image_grid_thw, attention_mask=bare.attention_mask)
    pos_coc, _ = rope(coc.input_ids, coc.mm_token_type_ids, coc.image_grid_thw, attention_mask=coc.attention_mask)

    # eager attention is bit-exact even at different padded lengths; SDPA's fused CPU kernel sums over the keys in an
    # order that depends on the padded length L (vector body vs tail), so compare it at equal L (`pad_to`)
    same_length = builder(imgs, INSTRUCTIONS, pad_to=coc.input_ids.shape[1])
    with attention(backbone, implementation), torch.no_grad():
        h_bare, l_bare = backbone.hidden_states(bare, layers=(1,))
        h_same, _ = backbone.hidden_states(same_length, layers=(1,))
        h_coc, l_coc = backbone.hidden_states(coc, layers=(1,))
    for i in range(2):
        end = int(bare.act_positions[i, -1]) + 1
        assert torch.equal(pos_bare[:, i, :end], pos_coc[:, i, :end])
        assert torch.equal(h_same[i, :end], h_coc[i, :end])
        assert torch.equal(coc.gather(h_coc, coc.act_positions)[i], same_length.gather(h_same, bare.act_positions)[i])
        if implementation == "eager":
            assert torch.equal(h_bare[i, :end], h_coc[i, :end]) and torch.equal(l_bare[1][i, :end], l_coc[1][i, :end])
        else:
            torch.testing.assert_close(h_bare[i, :end], h_coc[i, :end], rtol=0, atol=1e-5)
    # and the suffix does change what comes after the ACT tokens
    end = int(bare.act_positions[1, -1]) + 1
    assert not torch.allclose(h_same[1, end:], h_coc[1, end:])


def test_batch_independence(backbone):
    """Sample i's ACT states do not depend on sample j; alone, a sample has no padding, so compare within tolerance."""
    builder = PromptBuilder(backbone, 64, M, True, None)
    imgs = images(2)
    with torch.no_grad():
        both = builder(imgs, INSTRUCTIONS)
        act_both = both.gather(backbone.hidden_states(both)[0], both.act_positions)
        for i in range(2):
            alone = builder(imgs[i : i + 1], INSTRUCTIONS[i : i + 1])
            act_alone = alone.gather(backbone.hidden_states(alone)[0], alone.act_positions)
            torch.testing.assert_close(act_both[i : i + 1], act_alone, rtol=1e-5, atol=1e-5)
        # changing sample 1's image and text leaves sample 0 (which is padded in both batches) exactly as it was
        other = builder(np.stack([imgs[0], images(1, seed=5)[0]]), [INSTRUCTIONS[0], INSTRUCTIONS[1] + " twice"])
        act_other = other.gather(backbone.hidden_states(other)[0], other.act_positions)
    torch.testing.assert_close(act_other[0], act_both[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(act_other[1], act_both[1])


def test_224_px_gives_49_visual_tokens_per_image(backbone):
    builder = PromptBuilder(backbone, 224, M, True, None)
    batch = builder(images(2, size=256), INSTRUCTIONS)  # resized to 224 first
    assert builder.tokens_per_image == 49 and backbone.visual_tokens(224) == 49
    assert batch.image_grid_thw.tolist() == [[1, 14, 14]] * 2
    assert batch.pixel_values.shape == (2 * 196, 3 * 2 * 16 * 16)
    assert batch.mm_token_type_ids.sum(1).tolist() == [49, 49]
    # prompt length at 224 px, H=8, M=4, one camera: chat text + 49 image tokens + 1 + 4 + 8 query tokens
    tok = backbone.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                   "text": INSTRUCTIONS[0]}]}], tokenize=False, add_generation_prompt=True)
    expected = len(tok(chat, add_special_tokens=False)["input_ids"]) - 1 + 49 + 1 + M + H
    assert builder.prompt_length(INSTRUCTIONS[0]) == valid_lengths(batch)[0] == expected


def test_cameras_as_5d_array_or_list(backbone):
    builder = PromptBuilder(backbone, 64, M, False, None)
    stacked = images(2, cameras=2)
    a = builder(stacked, INSTRUCTIONS)
    b = builder([stacked[:, 0], torch.from_numpy(stacked[:, 1])], INSTRUCTIONS)
    for name in ("input_ids", "pixel_values", "image_grid_thw", "act_positions"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert a.image_grid_thw.shape == (4, 3) and a.mm_token_type_ids.sum(1).tolist() == [8, 8]
    # sample-major: the second image processed is sample 0's second camera
    single = builder(stacked[:, 1], INSTRUCTIONS)
    per_image = a.pixel_values.shape[0] // 4
    assert torch.equal(a.pixel_values[per_image : 2 * per_image], single.pixel_values[:per_image])
    # cameras of different sizes are resized to image_size
    mixed = builder([stacked[:, 0], images(2, size=48, seed=3)], INSTRUCTIONS)
    assert torch.equal(mixed.image_grid_thw, a.image_grid_thw)
    with torch.no_grad():
        assert torch.isfinite(backbone.hidden_states(a)[0]).all()


def test_separate_coc_mode(backbone):
    builder = PromptBuilder(backbone, 64, M, True, "separate")
    imgs = images(2)
    batch = builder(imgs, INSTRUCTIONS, COC)
    assert batch.labels is None and torch.equal(batch.input_ids, builder(imgs, INSTRUCTIONS).input_ids)
    coc = batch.coc
    assert coc.act_positions is None and coc.state_positions is None and coc.fut_positions is None
    assert not torch.isin(coc.input_ids, torch.tensor(backbone.act_token_ids)).any()
    assert coc.pixel_values is batch.pixel_values
    assert torch.equal(coc.input_ids, builder.coc_batch(imgs, INSTRUCTIONS, COC).input_ids)
    tok = backbone.tokenizer
    for i in range(2):
        labelled = coc.labels[i][coc.labels[i] != IGNORE]
        assert tok.decode(labelled) == COC[i] + IM_END
        text = tok.decode(coc.input_ids[i, : valid_lengths(coc)[i]])
        assert text.endswith("<|im_start|>assistant\n" + COC[i] + IM_END)
    backbone.model.zero_grad()
    loss = backbone.text_loss(coc)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert backbone.model.get_input_embeddings().weight.grad.abs().sum() > 0
    backbone.model.zero_grad(set_to_none=True)
    moved = batch.to("meta")
    assert moved.input_ids.is_meta and moved.coc.labels.is_meta and batch.coc.labels.device.type == "cpu"


def test_bad_inputs_fail_clearly(backbone):
    with pytest.raises(FplusError, match="multiple of 32"):
        PromptBuilder(backbone, 200, M, True, None)
    with pytest.raises(FplusError, match="FUT"):
        PromptBuilder(backbone, 64, M + 1, True, None)
    builder = PromptBuilder(backbone, 64, M, True, None)
    with pytest.raises(FplusError, match="coc_mode=None"):
        builder(images(2), INSTRUCTIONS, COC)
    with pytest.raises(FplusError, match="empty"):
        builder(images(2), ["pick up the cup", "  "])
    with pytest.raises(FplusError, match="2 instructions for a batch of 3"):
        builder(images(3), INSTRUCTIONS)
    with pytest.raises(FplusError, match="uint8"):
        builder(images(2).astype(np.float32), INSTRUCTIONS)
    with pytest.raises(FplusError, match="empty"):
        PromptBuilder(backbone, 64, M, True, "joint_after_act")(images(2), INSTRUCTIONS, ["fine", ""])
