"""Every active loss reaches a trainable weight of its path, in every fine-tuning mode, with the GPU profiles' own
layer settings (DESIGN 5): a tiny-width backbone with Qwen3-VL-2B's 28 decoder layers, loaded from a directory."""

import pytest
import torch

from fplus.errors import FplusError
from fplus.model.backbone import save_backbone
from fplus.model.config import PolicyConfig
from fplus.model.policy import FPlusPolicy
from fplus.model.tiny import build_tiny
from fplus.settings import load_settings
from tests.model.test_policy import STATS, make_batch

EXPERIMENTS = ("E0", "E1", "E2", "E3", "E4")
D = 32


@pytest.fixture(scope="module")
def deep_backbone(tmp_path_factory):
    """A tiny Qwen3-VL (d=64) with 28 decoder layers, saved with save_pretrained like a downloaded checkpoint."""
    from fplus.model.backbone import Backbone

    model, tokenizer, processor = build_tiny(num_layers=28)
    directory = tmp_path_factory.mktemp("deep")
    save_backbone(Backbone(model, tokenizer, processor, [], [], None, 64, 28, "deep", "deep"), directory)
    return str(directory)


def config_for(profile: str, experiment: str, finetune: str, backbone: str) -> PolicyConfig:
    settings = load_settings(profile, {"EXPERIMENT": experiment, "FINETUNE": finetune, "BACKBONE": backbone,
                                       "ACTION_HORIZON": 6, "IMAGE_SIZE": 64}, environ={}, dotenv=None)
    return PolicyConfig.from_settings(settings, action_dim=4, state_dim=4, world_dim=D)


def grads_of(policy: FPlusPolicy, loss: torch.Tensor) -> dict[str, float]:
    policy.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: p.grad.abs().sum().item() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("profile", ["l40s", "h100"])
@pytest.mark.parametrize("finetune", ["full", "frozen", "lora"])
def test_every_active_loss_reaches_its_trainable_path(deep_backbone, profile, finetune):
    for experiment in EXPERIMENTS:
        config = config_for(profile, experiment, finetune, deep_backbone)
        torch.manual_seed(0)
        policy = FPlusPolicy.build(config, STATS, "action", "observation.state").train()
        trainable = {n for n, p in policy.vlm.named_parameters() if p.requires_grad}
        if finetune == "frozen":
            assert not trainable
        if finetune == "lora":
            assert trainable and all("lora_" in n for n in trainable)
        terms, _ = policy.losses(policy.processor(make_batch(), with_coc=True), p_oracle=0.5)
        expected = {"l_action"} | ({"l_world"} if config.model.prophet else set()) | (
            {"l_text"} if config.model.coc else set()) | ({"l_align"} if config.model.flare_align else set())
        assert set(terms) == expected, experiment
        rows = policy.token_rows
        act = [rows.ids.tolist().index(i) for i in policy.backbone.act_token_ids]
        fut = [rows.ids.tolist().index(i) for i in policy.backbone.fut_token_ids]
        state = rows.ids.tolist().index(policy.backbone.state_token_id)
        for name, loss in terms.items():
            g = grads_of(policy, loss)
            backbone_hit = [n for n in g if n.startswith("vlm.") and g[n] > 0]
            where = f"{profile} {experiment} {finetune} {name}"
            if finetune != "frozen":  # the backbone's own trainable weights (all, or the LoRA adapters)
                assert backbone_hit, where
            if finetune == "lora":
                assert all("lora_" in n for n in backbone_hit), where
            row_grad = rows.weight.grad.abs().sum(-1)
            if name in ("l_action", "l_world", "l_text"):  # the ACT rows train in every mode
                assert (row_grad[act] > 0).all(), where
            if name == "l_action":  # and the state projection and <STATE> row, and the action head
                assert row_grad[state] > 0 and g["state_proj.weight"] > 0 and g["action_head.mlp.1.weight"] > 0
            if name == "l_world":
                assert g["prophet.out.weight"] > 0 and g["prophet.context.1.weight"] > 0, where
            if name == "l_align":
                assert (row_grad[fut] > 0).all() and g["align.mlp.1.weight"] > 0, where
                if finetune == "lora":  # an adapted layer at or below ALIGN_LAYER
                    layers = {int(n.split("layers.")[1].split(".")[0]) for n in backbone_hit}
                    assert min(layers) + 1 <= config.model.align_layer, where
        if config.model.injection:
            g = grads_of(policy, terms["l_action"])
            assert g["injection.gate"] > 0
        # only the added rows of the vocabulary train under lora/frozen: the embedding matrix stays frozen
        embedding = policy.backbone._vlm().get_input_embeddings().weight
        assert embedding.requires_grad == (finetune == "full")


def test_align_layer_below_the_lora_layers_is_a_config_error(deep_backbone):
    settings = load_settings("l40s", {"EXPERIMENT": "E4", "BACKBONE": deep_backbone, "ALIGN_LAYER": 10,
                                      "LORA_LAYERS": 8}, environ={}, dotenv=None)
    config = PolicyConfig.from_settings(settings, action_dim=4, state_dim=4, world_dim=D)
    with pytest.raises(FplusError, match=r"ALIGN_LAYER=10 is below the first LoRA layer 21 .*LORA_LAYERS >= 19"):
        FPlusPolicy.build(config, STATS, "action", "observation.state")
    # the old profile defaults (ALIGN_LAYER unset = middle layer 14, LoRA on the last 8) fail the same way
    unset = config.model_copy(update={"model": config.model.model_copy(update={"align_layer": None})})
    with pytest.raises(FplusError, match=r"ALIGN_LAYER=14 \(unset: the middle layer\) is below"):
        unset.check_loss_paths(28)
    for profile in ("l40s", "h100"):  # the shipped profiles pass with the real depth of Qwen3-VL-2B
        PolicyConfig.from_settings(load_settings(profile, {"EXPERIMENT": "E4"}, environ={}, dotenv=None),
                                   action_dim=7, state_dim=8, world_dim=768).check_loss_paths(28)


def test_e1_without_a_path_to_the_actions_is_a_config_error():
    with pytest.raises(FplusError, match="PROPHET_CONTEXT=false: L_world would train a side model that never "
                                         "reaches the actions"):
        load_settings(None, {"BACKBONE": "tiny", "PROPHET": "true", "PROPHET_CONTEXT": "false"}, environ={},
                      dotenv=None)
