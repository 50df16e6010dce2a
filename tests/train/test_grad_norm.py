"""The logged `grad_norm` is the global gradient norm of the optimiser step, before clipping, whatever GRAD_ACCUM is.

The reference is computed without the recipe: the same policy is rebuilt from the same seed, the step's micro-batches
are drawn in the sampler's order and collated with the policy's processor, and each micro-batch's gradient of
loss / GRAD_ACCUM (the scaling accelerate's `backward` applies) is summed by hand; its L2 norm over every parameter
must be the first train line's grad_norm. MAX_GRAD_NORM is far below it, so a norm logged after clipping (or averaged
over the micro-batches, as it once was: the true norm / GRAD_ACCUM) fails.
"""

import json

import pytest
import torch

from fplus.data.lerobot import LeRobotDataset, keys_from_settings
from fplus.data.split import split_episodes
from fplus.model.config import PolicyConfig
from fplus.model.policy import FPlusPolicy
from fplus.rundir import METRICS, run_dir_for
from fplus.train.data import Collate, EpochSampler, PolicySamples
from fplus.train.run import train_run
from fplus.train.state import p_oracle_at
from tests.helpers import toy_settings, write_toy_dataset

MICRO = 2
MAX_GRAD_NORM = 1e-3


def reference_norm(s) -> float:
    """The gradient norm of the first optimiser step of a run with settings `s`, computed by hand (float64 sum)."""
    ds = LeRobotDataset.open(s.data.dataset)
    keys = keys_from_settings(s.data)
    config = PolicyConfig.from_settings(s, action_dim=ds.features[keys.action]["shape"][0],
                                        state_dim=ds.features[keys.state]["shape"][0], world_dim=None)
    torch.manual_seed(s.train.seed)
    policy = FPlusPolicy.build(config, ds.stats, keys.action, keys.state)
    policy.train()
    split = split_episodes([e.index for e in ds.episodes], s.data.val_fraction, s.data.split_seed)
    samples = PolicySamples(ds, keys, split.train, horizon=config.model.action_horizon, history=config.history,
                            future=config.future)
    order = list(EpochSampler(len(samples), s.train.seed, 0))
    collate = Collate(policy.processor, with_coc=True)
    generator = torch.Generator().manual_seed(s.train.seed * 1000)  # process 0's sampling generator
    accum = s.train.grad_accum
    total_steps = s.train.max_steps
    p = p_oracle_at(0, total_steps, s.train.p_oracle_start, s.train.p_oracle_end)
    params = [q for q in policy.parameters() if q.requires_grad]
    summed: list[torch.Tensor | None] = [None] * len(params)
    for i in range(accum):
        batch = collate([samples[j] for j in order[i * MICRO:(i + 1) * MICRO]])
        loss, _ = policy(batch, p_oracle=p, generator=generator)
        grads = torch.autograd.grad(loss / accum, params, allow_unused=True)
        summed = [g if acc is None else (acc if g is None else acc + g) for acc, g in zip(summed, grads, strict=True)]
    squares = [g.double().pow(2).sum() for g in summed if g is not None]
    assert len(squares) > 10, "the gradient reaches the backbone and the heads"
    return float(torch.stack(squares).sum().sqrt())


@pytest.mark.parametrize("accum", [1, 2])
def test_logged_grad_norm_is_the_global_norm_before_clipping(tmp_path, accum):
    write_toy_dataset(tmp_path / "ds")
    s = toy_settings(tmp_path, tmp_path / "ds", EXPERIMENT="E0", BATCH_SIZE=MICRO, GRAD_ACCUM=accum, MAX_STEPS=1,
                     MAX_GRAD_NORM=MAX_GRAD_NORM, VAL_EVERY=1000)
    run_dir = run_dir_for(s)
    train_run(s, run_dir, progress_bar=False)
    lines = [json.loads(x) for x in (run_dir / METRICS).read_text().splitlines()]
    (train,) = [x for x in lines if x["kind"] == "train"]
    expected = reference_norm(s)
    assert expected > 100 * MAX_GRAD_NORM  # clipping is active at this step
    assert train["grad_norm"] == pytest.approx(expected, rel=1e-5)
