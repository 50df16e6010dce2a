"""Validation's CoC text loss (val_l_text): every validation sample's CoC text, token-weighted over batches, scored
apart from the plain prompts that the validation actions are predicted from."""

import pytest
import torch

from fplus import batch as K
from fplus.data.lerobot import DataKeys
from fplus.model.policy import FPlusPolicy
from fplus.train.data import Collate, PolicySamples
from fplus.train.validation import evaluate_modes
from tests.helpers import CAM, policy_config, write_toy_dataset

COC = {0: "the square moves right, so it follows the goal", 1: "it goes left because the target is there"}


@pytest.mark.parametrize("coc_mode", ["joint_after_act", "separate"])
def test_validation_scores_the_coc_text_of_every_sample_and_leaves_the_actions_alone(tmp_path, coc_mode):
    ds = write_toy_dataset(tmp_path / "ds", lengths=(8, 7))
    config = policy_config(backbone="tiny", action_dim=2, action_horizon=4, image_size=64, state_dim=2, coc=True,
                           coc_mode=coc_mode)
    torch.manual_seed(0)
    policy = FPlusPolicy.build(config, ds.stats, "action", "observation.state").eval()
    keys = DataKeys(image=CAM, state="observation.state", action="action", instruction="task")
    with_text = PolicySamples(ds, keys, [0, 1], horizon=4, history=4, future=4, coc=COC)
    plain = PolicySamples(ds, keys, [0, 1], horizon=4, history=4, future=4)
    scored = evaluate_modes(policy, with_text, ("none",), batch_size=4)
    bare = evaluate_modes(policy, plain, ("none",), batch_size=4)
    assert bare["text"] is None
    assert scored["modes"] == bare["modes"]  # the actions come from the plain prompts, bit for bit

    # independently: each sample alone through the training loss (CoC on it), weighted by its labelled tokens
    tokenizer = policy.backbone.tokenizer
    total, tokens = 0.0, 0
    for i in range(len(with_text)):
        sample = Collate(policy.processor, with_coc=True)([with_text[i]])
        n = len(tokenizer(sample[K.COC_TEXT][0], add_special_tokens=False)["input_ids"]) + 1  # + <|im_end|>
        with torch.no_grad():
            _, metrics = policy(sample)
        total += float(metrics["l_text"]) * n
        tokens += n
    assert scored["text"]["tokens"] == tokens and len(with_text) == 15
    assert scored["text"]["l_text"] == pytest.approx(total / tokens, rel=1e-5)
    assert scored["text"]["l_text"] > 1.0  # an untrained LM head on random text: far from 0


def test_unigram_baseline_by_hand():
    """Train: episode 0 ("a b", 2 frames), episode 1 ("b", 1 frame); val: episode 2 ("a c", 3 frames). Label ids are
    the words' letters plus the end id 9; vocabulary 10, add-one smoothing."""
    import math
    from types import SimpleNamespace

    import numpy as np

    from fplus.train.validation import unigram_text_baseline

    def label_ids(text):
        return [ord(w) - ord("a") for w in text.split()] + [9]

    train = SimpleNamespace(coc={0: "a b", 1: "b"}, episode_of=np.array([0, 0, 1]), rows=np.array([0, 1, 2]))
    val = SimpleNamespace(coc={2: "a c"}, episode_of=np.array([0, 0, 1, 2, 2, 2]), rows=np.array([3, 4, 5]))
    # training counts (frame-weighted): a 2, b 2 + 1 = 3, end 2 + 1 = 3 -> 8 tokens, + 10 for add-one
    p = {"a": 3 / 18, "c": 1 / 18, "end": 4 / 18}
    expected = -(math.log(p["a"]) + math.log(p["c"]) + math.log(p["end"])) / 3  # every val frame alike
    assert unigram_text_baseline(label_ids, 10, train, val) == pytest.approx(expected, rel=1e-12)
