"""Self-contained checkpoints (the Redesign issue): a policy built from a hub id records the commit of its backbone,
reloads that commit offline even after upstream moved `main`, and reads its processor from the checkpoint."""

import json

import numpy as np
import pytest
import torch

from fplus import batch as K
from fplus.errors import CheckpointError
from fplus.model.policy import PROCESSOR_DIR, FPlusPolicy
from fplus.model.processor import PROCESSOR_CONFIG
from tests.helpers import policy_config
from tests.model.test_backbone_hub_cache import PARAM, REPO, add_snapshot, commit_of, hub_cache  # noqa: F401

STATS = {"action": {"mean": np.zeros(3), "std": np.ones(3)}}


def observation(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {K.IMAGES: torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=g),
            K.INSTRUCTIONS: ["open the drawer", "press the button"]}


@pytest.mark.parametrize("finetune", ["frozen", "lora"])
def test_a_saved_policy_reloads_the_backbone_commit_it_was_trained_on(hub_cache, tmp_path, finetune):  # noqa: F811
    old, new = commit_of("old"), commit_of("new")
    add_snapshot(hub_cache, REPO, old)
    config = policy_config(backbone=REPO, action_dim=3, action_horizon=4, image_size=64, finetune=finetune)
    assert config.backbone_revision is None
    policy = FPlusPolicy.build(config, STATS, "action", None).eval()
    assert policy.config.backbone_revision == old  # resolved when the backbone was loaded
    obs = observation()
    before = policy.predict_action_chunk(policy.processor(obs))
    saved = policy.save(tmp_path / "policy")
    assert json.loads((saved / "config.json").read_text())["backbone_revision"] == old

    add_snapshot(hub_cache, REPO, new, shift=1.0)  # upstream pushes new base weights; refs/main moves to them
    assert FPlusPolicy.build(config, STATS, "action", None).config.backbone_revision == new  # a new run gets them
    loaded = FPlusPolicy.load(saved).eval()
    assert loaded.config.backbone_revision == old
    base = dict(loaded.vlm.named_parameters())
    # the shifted base weight (under LoRA: the adapted layer's frozen base_layer)
    name = next(k for k in base if "layers.0.mlp.down_proj" in k and k.endswith("weight") and "lora_" not in k)
    assert torch.equal(base[name], dict(policy.vlm.named_parameters())[name])
    assert torch.equal(loaded.predict_action_chunk(loaded.processor(obs)), before)


def test_the_processor_is_read_from_the_checkpoint(tmp_path):
    policy = FPlusPolicy.build(policy_config(backbone="tiny", action_dim=3, action_horizon=4, image_size=64),
                               STATS, "action", None).eval()
    saved = policy.save(tmp_path / "policy")
    loaded = FPlusPolicy.load(saved)
    assert loaded.processor.tokens.tokenizer.name_or_path == str(saved / PROCESSOR_DIR)
    obs = observation(1)
    a, b = policy.processor(obs)[K.PROMPT], loaded.processor(obs)[K.PROMPT]
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert torch.equal(a.act_positions, b.act_positions)

    (saved / PROCESSOR_DIR / PROCESSOR_CONFIG).unlink()
    with pytest.raises(CheckpointError, match=f"holds no saved processor \\({PROCESSOR_CONFIG} missing\\)"):
        FPlusPolicy.load(saved)


def test_a_processor_whose_tokens_do_not_fit_the_backbone_is_refused(tmp_path):
    policy = FPlusPolicy.build(policy_config(backbone="tiny", action_dim=3, action_horizon=4, image_size=64),
                               STATS, "action", None)
    saved = policy.save(tmp_path / "policy")
    other = FPlusPolicy.build(policy_config(backbone="tiny", action_dim=3, action_horizon=6, image_size=64),
                              STATS, "action", None)
    other.processor.save_pretrained(saved / PROCESSOR_DIR)  # the processor of a policy with 6 ACT tokens
    with pytest.raises(CheckpointError, match="does not fit the backbone tiny"):
        FPlusPolicy.load(saved)
