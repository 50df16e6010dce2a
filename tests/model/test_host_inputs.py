"""The backbone's data-dependent inputs computed on the host (fplus.model.host_inputs) are exactly what transformers
computes on the device: M-RoPE positions, the 4D causal mask with padding, the vision encoder's grid inputs; and the
CoC fraction (COC_FRACTION) puts CoC text on the first k samples only."""

import math

import numpy as np
import pytest
import torch

from fplus.errors import ConfigError
from fplus.model.backbone import load_backbone
from fplus.model.processor import coc_samples
from fplus.model.prompt import IGNORE, PromptBuilder
from tests.model.test_prompt import attention

H, M = 4, 2
INSTRUCTIONS = ["a", "pick the red cup up and put it in the drawer", "open it"]
COC = ["so it moves", "because the drawer is closed the arm pulls first", "the long reason why it is so, at last"]


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny", action_horizon=H, num_fut_tokens=M, use_state=True)


def images(b, cameras=2, size=64):
    return np.random.default_rng(0).integers(0, 256, (b, cameras, size, size, 3), dtype=np.uint8)


def transformers_path(vlm, p):
    """What the model computes when left alone: positions, mask and vision inputs from the device tensors."""
    return vlm.model(input_ids=p.input_ids, attention_mask=p.attention_mask, pixel_values=p.pixel_values,
                     image_grid_thw=p.image_grid_thw, mm_token_type_ids=p.mm_token_type_ids,
                     use_cache=False).last_hidden_state


def test_mrope_positions_equal_transformers_get_rope_index(backbone):
    p = PromptBuilder(backbone, 64, M, True, "joint_after_act")(images(3), INSTRUCTIONS, COC)
    assert len(set(p.attention_mask.sum(1).tolist())) == 3, "three different lengths: padding in two rows"
    expected, _ = backbone.model.model.get_rope_index(p.input_ids, p.mm_token_type_ids, p.image_grid_thw,
                                                      attention_mask=p.attention_mask)
    assert p.position_ids.shape == (3, 3, p.input_ids.shape[1])
    assert torch.equal(p.position_ids, expected)
    # the images' positions are 2D (t, h, w differ inside an image), so a plain arange would not pass
    assert not torch.equal(p.position_ids[0], p.position_ids[1])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_backbone_with_host_inputs_equals_transformers_own_path_bit_for_bit(backbone, implementation):
    p = PromptBuilder(backbone, 64, M, True, "joint_after_act")(images(3), INSTRUCTIONS, COC)
    with attention(backbone, implementation), torch.no_grad():
        ours = backbone.forward(p).last_hidden
        theirs = transformers_path(backbone.model, p)
    assert torch.equal(ours, theirs)


def test_the_image_token_check_uses_the_host_count_and_still_refuses_a_mismatch(backbone):
    import dataclasses

    from tests.sync_counter import SyncCounter

    p = PromptBuilder(backbone, 64, M, True, "joint_after_act")(images(3), INSTRUCTIONS, COC)
    assert p.image_tokens == int((p.input_ids == backbone.model.config.image_token_id).sum()) > 0
    with torch.no_grad(), SyncCounter(qualified=True) as syncs:
        backbone.forward(p)
    assert not any("get_placeholder_mask" in site for site in syncs.by_site), syncs.by_site
    assert "get_placeholder_mask" not in vars(backbone.model.model)  # the override ends with the forward
    with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: 7"), \
            torch.no_grad():
        backbone.forward(dataclasses.replace(p, image_tokens=7))
    # without a host count (a PromptBatch made elsewhere) transformers checks it itself, reading the device
    with torch.no_grad(), SyncCounter(qualified=True) as syncs:
        plain = backbone.forward(dataclasses.replace(p, image_tokens=None)).last_hidden
    assert any("get_placeholder_mask" in site for site in syncs.by_site)
    with torch.no_grad():
        assert torch.equal(plain, backbone.forward(p).last_hidden)


def test_to_keeps_the_grid_on_the_host_and_moves_the_rest(backbone):
    p = PromptBuilder(backbone, 64, M, True, "separate")(images(2), INSTRUCTIONS[:2], COC[:2])
    moved = p.to("meta")
    assert moved.image_grid_thw.device.type == "cpu" and torch.equal(moved.image_grid_thw, p.image_grid_thw)
    assert moved.input_ids.device.type == "meta" and moved.causal_mask.device.type == "meta"
    assert moved.position_ids.device.type == "meta" and moved.coc.image_grid_thw.device.type == "cpu"


@pytest.mark.parametrize(("b", "fraction", "k"), [(8, 0.25, 2), (4, 0.25, 1), (3, 0.5, 2), (5, 1.0, 5), (1, 0.1, 1)])
def test_coc_samples_is_the_ceiling_of_the_fraction(b, fraction, k):
    assert coc_samples(b, fraction) == k == max(1, math.ceil(fraction * b - 1e-9))


def test_coc_samples_refuses_a_fraction_outside_0_1():
    with pytest.raises(ConfigError, match="COC_FRACTION=0"):
        coc_samples(4, 0.0)


def test_joint_coc_on_the_first_k_samples_splits_the_batch_and_leaves_the_action_prompt_unchanged(backbone):
    builder = PromptBuilder(backbone, 64, M, True, "joint_after_act")
    full = builder(images(3), INSTRUCTIONS, COC)
    part = builder(images(3), INSTRUCTIONS, COC, coc_samples=2)
    bare = builder(images(3), INSTRUCTIONS)
    assert full.rest is None and part.num_samples == 3 and [len(p.input_ids) for p in part.parts] == [2, 1]
    # samples 0, 1 with their CoC texts are full's rows exactly, labels included
    n = full.attention_mask[:2].sum(1)
    assert part.input_ids.shape[1] == int(n.max())
    for i in (0, 1):
        assert torch.equal(part.input_ids[i, :n[i]], full.input_ids[i, :n[i]])
        assert torch.equal(part.labels[i, :n[i]], full.labels[i, :n[i]])
    assert torch.equal(part.act_positions, full.act_positions[:2]) and (part.labels != IGNORE).sum() > 0
    rows = len(full.pixel_values) // 3
    assert torch.equal(part.pixel_values, full.pixel_values[:2 * rows])
    # sample 2: the bare action prompt, no labels, padded to its own length, not to the CoC rows' longest
    rest, n2 = part.rest, int(bare.attention_mask[2].sum())
    assert rest.labels is None and rest.rest is None and rest.coc is None
    assert rest.input_ids.shape == (1, n2) and n2 < full.input_ids.shape[1]
    assert torch.equal(rest.input_ids[0], bare.input_ids[2, :n2])
    assert torch.equal(rest.position_ids[:, 0], bare.position_ids[:, 2, :n2])
    assert torch.equal(rest.pixel_values, full.pixel_values[2 * rows:])
    assert torch.equal(rest.image_grid_thw, full.image_grid_thw[4:])
    assert torch.equal(rest.act_positions, bare.act_positions[2:])
    moved = part.to("meta")
    assert moved.rest.input_ids.device.type == "meta" and moved.rest.image_grid_thw.device.type == "cpu"


def test_separate_coc_batch_holds_the_first_k_samples_with_their_pixels(backbone):
    builder = PromptBuilder(backbone, 64, M, True, "separate")
    full = builder(images(3), INSTRUCTIONS, COC)
    part = builder(images(3), INSTRUCTIONS, COC, coc_samples=2)
    assert part.coc.input_ids.shape[0] == 2 and part.coc.image_grid_thw.shape[0] == 2 * 2
    rows = len(full.coc.pixel_values) // 3
    assert torch.equal(part.coc.pixel_values, full.coc.pixel_values[: 2 * rows])
    n = int(part.coc.attention_mask[1].sum())
    assert torch.equal(part.coc.input_ids[1, :n], full.coc.input_ids[1, :n])
    assert torch.equal(part.input_ids, full.input_ids)
    with pytest.raises(ConfigError, match="coc_samples=4 for a batch of 3"):
        builder(images(3), INSTRUCTIONS, COC, coc_samples=4)


def test_attn_impl_auto_is_sdpa_without_cuda_and_flash_is_refused_without_it(monkeypatch):
    from fplus.model.backbone import resolve_attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_attention("auto") == "sdpa" and resolve_attention("eager") == "eager"
    with pytest.raises(ConfigError, match="ATTN_IMPL=flash_attention_2 needs CUDA and the flash-attn package"):
        resolve_attention("flash_attention_2")


def test_attn_impl_reaches_the_loaded_backbone():
    eager = load_backbone("tiny", action_horizon=H, num_fut_tokens=0, use_state=False, attn_impl="eager")
    assert eager.model.config._attn_implementation == "eager"
    assert eager.model.model.visual.config._attn_implementation == "eager"
