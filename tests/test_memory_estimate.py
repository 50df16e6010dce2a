"""fplus.memory: parameter counts from configs, the components of a hand-computed case, and the estimate against
the measured peak of a mid-size CPU training step.

How the peak is measured: tracemalloc does not see torch's allocator, and ru_maxrss is a high-water mark of the
whole process since it started (imports, the build's transients). So a fresh subprocess runs with glibc's
MALLOC_MMAP_THRESHOLD_ fixed at 64 KiB (every tensor buffer is its own mmap, returned to the system when freed, so
the resident set follows the live tensors instead of the heap's high-water mark). It first trains one step of a
tiny policy (torch's and transformers' one-time allocations: ~130 MiB that would otherwise be counted), records the
anonymous resident memory (RssAnon), builds the mid-size policy and trains one step (the AdamW states appear), resets
the kernel's high-water mark (`/proc/self/clear_refs` 5), trains a second step and reads VmHWM. The peak of the step
is VmHWM - RssFile (file-backed pages: libraries; unchanged once warmed up) - the RssAnon before the build, which
holds the weights, the AdamW states and the step's transients: what the estimate sums. Measured: 985 MiB against an
estimate of 979 MiB (weights 0.39, gradients + AdamW 0.07, activations 0.10, CoC logits 0.40 GiB).
"""

import json
import os
import subprocess
import sys

import pytest

from fplus.memory import CUDA_CONTEXT_BYTES, GPU_OVERHEAD, BackboneShape, SizeUnknown, backbone_shape, estimate_memory
from fplus.settings import load_settings

# A representative demo CoC label: `fplus coc generate --profile demo` on a drawer-open-v3 episode (plain style)
COC = ("The goal is to pull the drawer open by its handle. First the hand moves up to the drawer, because it must "
       "touch the drawer before it can pull it open. Finally it stays in contact and moves the drawer down, because "
       "that is how to pull the drawer open by its handle.")
INSTRUCTION = "pick up the black bowl next to the plate and place it on the plate"
WORLD_DIM, ACTION_DIM, STATE_DIM = 768, 7, 8

PROBE = r'''
import ctypes, gc, json, re, sys

import numpy as np
import torch

from fplus import batch as K
from fplus.model.config import PolicyConfig
from fplus.model.policy import FPlusPolicy
from fplus.settings import load_settings

values, instruction, coc, world, action, state = json.loads(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")


def status(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def settle():
    gc.collect()
    libc.malloc_trim(0)


def policy_of(overrides):
    s = load_settings(None, {**values, **overrides}, environ={}, dotenv=None)
    config = PolicyConfig.from_settings(s, action_dim=action, state_dim=state, world_dim=world)
    stats = {"action": {"mean": np.zeros(action), "std": np.ones(action)},
             "state": {"mean": np.zeros(state), "std": np.ones(state)}}
    torch.manual_seed(0)
    policy = FPlusPolicy.build(config, stats, "action", "state").train()
    b, size, h = s.train.batch_size, s.model.image_size, s.model.action_horizon
    g = torch.Generator().manual_seed(0)
    raw = {K.IMAGES: torch.randint(0, 256, (b, size, size, 3), dtype=torch.uint8, generator=g),
           K.INSTRUCTIONS: [instruction] * b, K.STATE: torch.randn(b, state, generator=g),
           K.ACTIONS: torch.randn(b, h, action, generator=g), K.ACTION_PAD: torch.zeros(b, h, dtype=torch.bool),
           K.Z_HIST: torch.randn(b, s.world.history, world, generator=g),
           K.Z_FUTURE: torch.randn(b, s.world.future, world, generator=g),
           K.FUTURE_VALID: torch.ones(b, s.world.future, dtype=torch.bool), K.COC_TEXT: [coc] * b}
    batch = policy.processor(raw, with_coc=True)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)

    def step():
        loss, _ = policy(batch, p_oracle=0.5, generator=g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return policy, batch, step


_, _, warm = policy_of({"BACKBONE": "tiny"})
warm()
del warm
settle()
base = status("RssAnon")
policy, batch, step = policy_of({})
settle()
built = status("RssAnon") - base
step()
settle()
open("/proc/self/clear_refs", "w").write("5")
step()
peak = status("VmHWM") - status("RssFile") - base
print(json.dumps({"peak": peak, "built": built, "tokens": int(batch[K.PROMPT].attention_mask.sum(1).float().mean()),
                  "params": sum(p.numel() for p in policy.parameters()),
                  "trainable": sum(p.numel() for p in policy.parameters() if p.requires_grad)}))
'''


def settings(**values):
    return load_settings(None, {k: str(v) for k, v in values.items()}, environ={}, dotenv=None)


@pytest.mark.slow
def test_estimate_is_within_25_percent_of_the_measured_peak_of_a_mid_size_step():
    from fplus.coc.tokens import load_token_counter

    coc_tokens = load_token_counter("tiny").count(COC)  # 118: the estimate's CoC length is the label's
    values = {"BACKBONE": "random-qwen3-vl-mid", "EXPERIMENT": "E4", "BATCH_SIZE": "2", "IMAGE_SIZE": "224",
              "FINETUNE": "lora", "PRECISION": "fp32", "STATE_KEY": "observation.state",
              "COC_MAX_TOKENS": str(coc_tokens)}
    est = estimate_memory(settings(**values), world_dim=WORLD_DIM, action_dim=ACTION_DIM, state_dim=STATE_DIM)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    args = json.dumps([values, INSTRUCTION, COC, WORLD_DIM, ACTION_DIM, STATE_DIM])
    out = subprocess.run([sys.executable, "-c", PROBE, args], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["params"] == est.params and measured["trainable"] == est.trainable  # counted from the config
    assert measured["built"] == pytest.approx(est.weights, rel=0.05)  # the built policy holds its float32 weights
    assert measured["tokens"] == pytest.approx(est.tokens, rel=0.1)  # 222 in the batch, 224 estimated
    assert est.logits > 0 and est.activations > 0
    assert est.total == pytest.approx(measured["peak"], rel=0.25), (est.components(), measured)


def test_parameter_counts_from_the_config_are_the_built_models():
    from fplus.model.backbone import load_backbone
    from fplus.model.tiny import build_tiny

    model, _, _ = build_tiny()
    shape = backbone_shape("tiny")
    assert shape.params() == sum(p.numel() for p in model.parameters())
    grown = load_backbone("tiny", action_horizon=4, num_fut_tokens=2, use_state=True).model  # 7 tokens added
    assert shape.params(7) == sum(p.numel() for p in grown.parameters()) > shape.params()
    assert backbone_shape("random-qwen3-vl-mid").params() == 99_249_408  # sum(numel) of build_random's model
    for name, known in (("random-qwen3-vl-2b", 2.13e9), ("qwen3-vl-4b", 4.4e9)):  # fplus.doctor.KNOWN_PARAMS
        assert backbone_shape(name).params() == pytest.approx(known, rel=0.01)


def test_a_local_config_json_and_an_uncached_hub_id(tmp_path, monkeypatch):
    from fplus.model.tiny import build_tiny_tokenizer, tiny_config

    config = tiny_config(build_tiny_tokenizer()).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    local = backbone_shape(str(tmp_path))
    assert local.origin == str(tmp_path / "config.json") and local.params() == backbone_shape("tiny").params()
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    with pytest.raises(SizeUnknown, match="model_type 'llava' is not qwen3_vl"):
        backbone_shape(str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SizeUnknown, match="config of someone/some-vlm is not in the local hub cache"):
        backbone_shape("someone/some-vlm")
    released = backbone_shape("qwen3-vl-2b")  # not cached: the released sizes
    assert "released sizes" in released.origin and released.layers == 28 and released.hidden == 2048


# A small Qwen3-VL by hand: text d=64, 2 layers, MLP 128, 4 heads x 16 (q 64), 2 kv heads (kv 32), vocab 1000 tied;
# vision 32 wide, MLP 64, depth 2, patch 16, merge 2, 16 positions, one deepstack merger.
SMALL = BackboneShape(origin="by hand", vocab=1000, hidden=64, layers=2, intermediate=128, q_dim=64, kv_dim=32,
                      head_dim=16, tied=True, attention_bias=False, vision_hidden=32, vision_intermediate=64,
                      vision_depth=2, vision_out=64, patch=16, merge=2, temporal_patch=2, in_channels=3,
                      vision_positions=16, deepstack=1)


def test_components_of_a_hand_computed_case():
    # decoder layer: q 64x64 + k, v 2 x 64x32 + o 64x64 + q/k norms 2x16 + MLP 3 x 64x128 + 2 norms 2x64 = 37,024
    assert SMALL.layer_params == 37_024
    assert SMALL.text_params() == 1000 * 64 + 2 * 37_024 + 64 == 138_112
    # vision: patch 3x2x16x16x32 + 32, positions 16x32, 2 blocks x 8,544, norm 64, merger (128x128 + 128 + 128x64 +
    # 64 = 24,768) and one deepstack merger (its norm 256 + 24,768)
    assert SMALL.vision_params == 49_184 + 512 + 2 * 8_544 + 64 + 24_768 + 25_024 == 116_640
    s = settings(BACKBONE="tiny", EXPERIMENT="E0", FINETUNE="lora", LORA_RANK=4, LORA_LAYERS=1, PRECISION="bf16",
                 BATCH_SIZE=3, IMAGE_SIZE=64, ACTION_HORIZON=4)
    e = estimate_memory(s, action_dim=2, shape=SMALL)
    lora = 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))  # q, o; k, v; gate, up, down of the last layer
    heads = 4 * 64 + 2 * 64 + 64 * 128 + 2 * 64 + 128 * 2 + 2  # action head: step rows, LN, 64->128->2 MLP
    rows = 4 * 64  # the 4 ACT tokens' rows
    assert (lora, heads) == (4_096, 8_962)
    assert e.params == 138_112 + 116_640 + lora + heads + rows == 268_066
    assert e.trainable == lora + heads + rows == 13_314
    assert e.tokens == (64 // 32) ** 2 + 2 + 40 + 4 == 50  # visual + delimiters, text, ACT
    # bf16: the frozen weights are stored in bf16, the trainable ones in float32; LoRA: no autocast copies (the
    # frozen weights are bf16 already)
    assert e.weights == 4 * 13_314 + 2 * (268_066 - 13_314) and e.gradients == 4 * 13_314 and e.optimizer == 8 * 13_314
    assert e.autocast_copies == 0
    layer = 6 * 64 + 5 * 64 + 4 * 32 + 4 * 128  # 1,344 saved elements a token and layer
    vision = 3 * (64 // 16) ** 2 * (11 * 32 + 2 * 64)  # one block's, at a time (LoRA: no gradient in the tower)
    assert e.activations == 2 * (3 * 50 * 2 * layer + vision + 3 * 50 * 4 * 64) == 929_280
    assert e.logits == 0 and e.total == 1_651_808
    assert e.gpu_total == 1_651_808 * (1 + GPU_OVERHEAD) + CUDA_CONTEXT_BYTES
    # full fine-tuning in bf16: float32 weights, each linear's bf16 copy saved for backward (decoder and tower)
    f = estimate_memory(settings(BACKBONE="tiny", EXPERIMENT="E0", FINETUNE="full", PRECISION="bf16", BATCH_SIZE=3,
                                 IMAGE_SIZE=64, ACTION_HORIZON=4), action_dim=2, shape=SMALL)
    assert f.weights == 4 * f.params and f.autocast_copies == 2 * 2 * 37_024 + 2 * 116_640

    coc = settings(BACKBONE="tiny", EXPERIMENT="E3", FINETUNE="lora", LORA_RANK=4, LORA_LAYERS=1, PRECISION="bf16",
                   BATCH_SIZE=3, IMAGE_SIZE=64, ACTION_HORIZON=4, COC_MAX_TOKENS=10, GRADIENT_CHECKPOINTING="true")
    c = estimate_memory(coc, action_dim=2, shape=SMALL)
    assert c.tokens == 50 + 10 + 2  # the CoC text and its delimiters after the ACT tokens
    assert c.logits == 3 * (3 * 10 * 1000 * 4)  # logits, log-softmax, gradient: float32 over the vocabulary
    assert c.autocast_copies == 0  # LoRA: the frozen LM head and layers are bf16 already
    # COC_FRACTION: only ceil(0.34 x 3) = 2 samples' CoC tokens reach the LM head
    part = estimate_memory(coc.model_copy(update={"coc": coc.coc.model_copy(update={"fraction": 0.34})}),
                           action_dim=2, shape=SMALL)
    assert part.logits == 3 * (2 * 10 * 1000 * 4)
    # ... and the third sample's pass is not padded to their length (PromptBatch.rest)
    assert part.activations == 2 * ((2 * 62 + 50) * (2 * 64 + layer) + vision + (2 * 62 + 50) * 4 * 64)
    # checkpointed: each layer keeps its input (64 a token), one layer's activations at a time
    assert c.activations == 2 * (3 * 62 * (2 * 64 + layer) + vision + 3 * 62 * 4 * 64)


def test_full_finetuning_trains_everything_and_costs_more():
    lora = estimate_memory(settings(BACKBONE="qwen3-vl-2b", EXPERIMENT="E2", FINETUNE="lora"))
    full = estimate_memory(settings(BACKBONE="qwen3-vl-2b", EXPERIMENT="E2", FINETUNE="full"))
    assert full.params - full.trainable == 0 < lora.trainable < 0.05 * lora.params
    # bf16 (the default PRECISION): LoRA stores the frozen weights in bf16, full fine-tuning all in float32
    assert full.total > 2 * lora.total and full.weights == pytest.approx(2 * lora.weights, rel=0.05)
    bigger = estimate_memory(settings(BACKBONE="qwen3-vl-2b", EXPERIMENT="E2", FINETUNE="lora", BATCH_SIZE=64))
    assert bigger.activations == pytest.approx(lora.activations * 64 / 8, rel=0.01)  # BATCH_SIZE default 8
