"""A training step reads back from the device once: the finiteness check of its losses and gradient norm.

Counted on CPU with tests.sync_counter (every Python-level read of a tensor's value): the metrics stay tensors and
are read at LOG_EVERY, AdamW is fused (its step counters stay on the device), and the backbone's data-dependent inputs
(M-RoPE positions, causal mask, the vision encoder's grid inputs) are computed on the host by the data pipeline and
fplus.model.host_inputs. Reads of host tensors by design are listed in HOST_READS (on a GPU they wait for nothing:
the image grid stays on the host, fplus.model.prompt.HOST_FIELDS, and the sdpa vision attention splits the packed
images by host bounds). Qwen3-VL's check that the image tokens match the image features, which read the count
back from the device every forward, is made against the prompt builder's host count
(fplus.model.host_inputs.placeholder_check_on_host): nothing else in a step reads the device.
"""

import json

import pytest

from fplus.train.recipe import TrainRecipe
from tests.helpers import toy_settings
from tests.sync_counter import SyncCounter

HOST_READS = {
    "transformers/vision_utils.py:get_vision_position_ids",  # on the host grid, from fplus.model.host_inputs
    "transformers/models/qwen3_vl/modeling_qwen3_vl.py:Qwen3VLVisionAttention.forward",  # sdpa split, host bounds
    "transformers/models/qwen3_vl/modeling_qwen3_vl.py:Qwen3VLModel.get_image_features",  # split sizes, host grid
}
STEPS = 3


def coc_file(path, episodes=5):
    path.write_text("".join(json.dumps({"episode_index": e, "coc_text": f"the square moves right, so step {e}"})
                            + "\n" for e in range(episodes)))
    return path


@pytest.mark.parametrize(("experiment", "extra"), [("E0", {}), ("E2", {}), ("E4", {"COC_MODE": "joint_after_act"}),
                                                   ("E4", {"COC_MODE": "separate", "COC_FRACTION": 0.5}),
                                                   ("E4", {"COC_MODE": "joint_after_act", "COC_FRACTION": 0.5})])
def test_one_host_sync_per_optimizer_step_outside_logging_steps(toy, tmp_path, experiment, extra):
    s = toy_settings(toy, toy / "ds", OUTPUT_DIR=tmp_path, EXPERIMENT=experiment, MAX_STEPS=20, LOG_EVERY=100,
                     NUM_WORKERS=0, COC_JSONL=coc_file(tmp_path / "coc.jsonl"), BATCH_SIZE=4, **extra)
    recipe = TrainRecipe(s, tmp_path / experiment, progress_bar=False)
    recipe.setup()
    batches = iter(recipe._loader(recipe.train_set, recipe._sampler(0)))
    recipe.train_step([next(batches)])  # the first step builds the optimiser state
    steps = [[next(batches)] for _ in range(STEPS)]
    with SyncCounter(qualified=True) as syncs:
        for step in steps:
            metrics = recipe.train_step(step)
    ours = {k: v for k, v in syncs.by_site.items() if k.startswith("fplus/")}
    other = {k: v for k, v in syncs.by_site.items()
             if not k.startswith("fplus/") and not any(k.startswith(h) for h in HOST_READS)}  # also <listcomp>s
    assert ours == {"fplus/train/recipe.py:TrainRecipe._finite": STEPS}, syncs.by_site
    assert other == {}, other  # nothing inside transformers reads the device
    # the step's metrics are still device tensors, read at logging steps in one go
    assert all(hasattr(metrics[k], "device") for k in ("loss", "l_action", "grad_norm"))
    read = recipe._read({**metrics, "samples_per_s": 1.0})
    assert isinstance(read["loss"], float) and read["loss"] == pytest.approx(float(metrics["loss"]))
