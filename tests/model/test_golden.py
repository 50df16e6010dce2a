r"""Golden values (torchtune style): the tiny random policy, built from fixed seeds, gives fixed numbers.

`golden_outputs()` below is the ONLY place that builds a policy or calls it: when the policy API changes, adapt that
one function; the numbers stored in tests/fixtures/golden_tiny_policy.json must then still match to 1e-6 (abs).
What is pinned:

- E0: raw actions (B, H, A) of a fixed batch (images, instructions, state);
- E2 with the world latents given (z_hist; z_future for the oracle mode), latent statistics set and the gate
  opened to tanh(0.5): the actions, the Prophet's prediction (standardised space) and the oracle-mode actions;
  at init (gate 0) E2's actions equal E0's bit for bit;
- one training step of that E2 (train mode, p_oracle 0.5 from a seeded generator): l_action, l_world, cos_world
  and the total loss, and the loss of the same batch after one SGD step (lr 0.05) on every trainable weight.

Thread count: everything runs under torch.set_num_threads(1) (restored afterwards), so the float reduction order
is the same whatever the machine's thread settings (here 1 and 4 threads give the same bits anyway).

Regenerate ONLY after a deliberate change of the numbers (a new init, another tiny config), from the repository
root, and say why in the commit:

    HF_HUB_OFFLINE=1 .venv/bin/python - <<'EOF'
    import json, torch, transformers
    from tests.model.test_golden import GOLDEN, golden_outputs
    GOLDEN.write_text(json.dumps({"generated_with": {"torch": torch.__version__,
                                                     "transformers": transformers.__version__},
                                  "values": golden_outputs()}, indent=1) + "\n")
    EOF
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden_tiny_policy.json"
ATOL = 1e-6
B, H, A, S, D, T, KF = 2, 4, 3, 2, 16, 3, 2  # batch, horizon, action dim, state dim, latent dim, history, future


def golden_outputs() -> dict[str, list]:
    """Build E0 and E2 tiny policies from fixed seeds, predict and take one training step: name -> nested lists of
    floats. Every policy construction and call of this module is in here (single-threaded, restored after)."""
    from fplus import batch as K
    from fplus.model.policy import FPlusPolicy
    from tests.helpers import policy_config

    g = torch.Generator().manual_seed(2024)
    stats = {"action": {"mean": np.array([0.5, -0.5, 0.0]), "std": np.array([2.0, 1.0, 0.5])},
             "observation.state": {"mean": np.array([1.0, -1.0]), "std": np.array([0.5, 2.0])}}
    obs = {K.IMAGES: torch.randint(0, 256, (B, 64, 64, 3), dtype=torch.uint8, generator=g),
           K.INSTRUCTIONS: ["push the puck to the goal", "open the drawer"],
           K.STATE: torch.randn(B, S, generator=g)}
    z_hist, z_future = 3.0 + torch.randn(B, T, D, generator=g), 3.0 + torch.randn(B, KF, D, generator=g)
    latent_mean, latent_std = torch.full((D,), 3.0), torch.linspace(0.5, 1.5, D)
    train_batch = {**obs, K.Z_HIST: z_hist, K.Z_FUTURE: z_future,
                   K.ACTIONS: torch.randn(B, H, A, generator=g),
                   K.ACTION_PAD: torch.tensor([[False] * H, [False] * (H - 1) + [True]]),
                   K.FUTURE_VALID: torch.tensor([[True, True], [True, False]])}

    def build(**flags) -> FPlusPolicy:
        world = dict(world_dim=D, history=T, future=KF, prophet_width=32, prophet_layers=1, prophet_heads=2,
                     injection_heads=2) if flags else {}
        config = policy_config(backbone="tiny", action_dim=A, action_horizon=H, image_size=64, state_dim=S,
                               **world, **flags)
        torch.manual_seed(0)
        return FPlusPolicy.build(config, stats, "action", "observation.state").eval()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: dict[str, torch.Tensor | float] = {}
        e0 = build()
        out["e0_actions"] = e0.predict_action_chunk(e0.processor(obs))
        e2 = build(prophet=True, injection=True)
        e2.set_latent_stats(latent_mean, latent_std)
        out["e2_init_actions"] = e2.predict_action_chunk(e2.processor({**obs, K.Z_HIST: z_hist}))
        with torch.no_grad():
            e2.injection.gate.fill_(0.5)
        prediction = e2.predict(e2.processor({**obs, K.Z_HIST: z_hist}))
        out["e2_actions"], out["e2_z_pred"] = prediction.actions, prediction.memory
        oracle = e2.processor({**obs, K.Z_HIST: z_hist, K.Z_FUTURE: z_future})
        out["e2_oracle_actions"] = e2.predict_action_chunk(oracle, corruption="oracle")
        e2.train()
        train_batch = e2.processor(train_batch, with_coc=True)
        loss, metrics = e2(train_batch, p_oracle=0.5, generator=torch.Generator().manual_seed(7))
        metrics = {k: float(v) for k, v in metrics.items()}  # 0-d tensors -> numbers
        out["train_step"] = [metrics["l_action"], metrics["l_world"], metrics["cos_world"], metrics["loss"]]
        optimizer = torch.optim.SGD([p for p in e2.parameters() if p.requires_grad], lr=0.05)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out["train_loss_after_one_step"] = e2(train_batch, p_oracle=0.5,
                                              generator=torch.Generator().manual_seed(7))[1]["loss"]
    finally:
        torch.set_num_threads(threads)
    return {k: v.tolist() if torch.is_tensor(v) else v for k, v in out.items()}


# ----- tests ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outputs() -> dict[str, list]:
    return golden_outputs()


@pytest.fixture(scope="module")
def golden() -> dict[str, list]:
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} is missing: write it with the snippet in the docstring of {Path(__file__).name}",
                    pytrace=False)
    return json.loads(GOLDEN.read_text())["values"]


def test_the_golden_file_pins_every_output(golden, outputs):
    assert sorted(golden) == sorted(outputs)
    shapes = {"e0_actions": (B, H, A), "e2_init_actions": (B, H, A), "e2_actions": (B, H, A),
              "e2_oracle_actions": (B, H, A), "e2_z_pred": (B, KF, D), "train_step": (4,),
              "train_loss_after_one_step": ()}
    assert {k: np.shape(v) for k, v in golden.items()} == shapes


@pytest.mark.parametrize("name", ["e0_actions", "e2_init_actions", "e2_actions", "e2_z_pred", "e2_oracle_actions",
                                  "train_step", "train_loss_after_one_step"])
def test_tiny_policy_matches_its_golden_values(golden, outputs, name):
    np.testing.assert_allclose(np.asarray(outputs[name], np.float64), np.asarray(golden[name], np.float64),
                               rtol=0, atol=ATOL, err_msg=f"{name} differs from {GOLDEN.name}")


def test_the_golden_cases_exercise_what_they_claim(golden):
    """The stored numbers are not degenerate: E2 at init is E0 exactly, the opened gate moves the actions, the
    oracle memory differs from the prediction, the step lowers the loss, and the total is the weighted sum."""
    e0, e2 = np.asarray(golden["e0_actions"]), np.asarray(golden["e2_actions"])
    assert np.array_equal(np.asarray(golden["e2_init_actions"]), e0)
    assert np.abs(e2 - e0).max() > 1e-3
    assert np.abs(np.asarray(golden["e2_oracle_actions"]) - e2).max() > 1e-3
    l_action, l_world, cos_world, loss = golden["train_step"]
    assert l_world == pytest.approx(1 - cos_world, abs=1e-6)
    assert loss == pytest.approx(l_action + 1.0 * l_world, abs=1e-6)  # lambda_world defaults to 1
    assert golden["train_loss_after_one_step"] < loss
