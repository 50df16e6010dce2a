import numpy as np
import pytest
import torch

from fplus.data.windows import causal_window
from fplus.world.encoders import DinoEncoder, Preprocess, VJEPAEncoder, build_encoder


def random_frames(n, h=40, w=56, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def test_preprocess_resizes_crops_and_normalises():
    p = Preprocess(resize=32, crop=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    gray = torch.full((2, 40, 60, 3), 255, dtype=torch.uint8)
    x = p(gray)
    assert x.shape == (2, 3, 24, 24)
    torch.testing.assert_close(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
    assert p(random_frames(1, 24, 24)).shape == (1, 3, 24, 24)


@pytest.mark.parametrize("model_id,pooling", [("tiny", "cls"), ("tiny", "mean"), ("tiny-dinov3", "cls"),
                                              ("tiny-dinov3", "mean")])
def test_dino_shapes_and_determinism(model_id, pooling):
    enc = DinoEncoder(model_id, pooling=pooling)
    frames = random_frames(3)[:, None]  # (B, 1, H, W, 3)
    z = enc.encode_frames(frames)
    assert z.shape == (3, enc.dim) and z.dtype == torch.float32 and torch.isfinite(z).all()
    again = DinoEncoder(model_id, pooling=pooling).encode_frames(frames)
    assert torch.equal(z, again), "tiny encoders are seeded: same weights in every process"
    expected_type = "dinov3_vit" if "dinov3" in model_id else "dinov2"
    assert enc.describe()["model_type"] == expected_type


def test_dino_pooling_differs():
    frames = random_frames(2)[:, None]
    assert not torch.allclose(DinoEncoder("tiny", "cls").encode_frames(frames),
                              DinoEncoder("tiny", "mean").encode_frames(frames))


def test_vjepa_shapes_window_rounded_to_tubelet():
    enc = VJEPAEncoder("tiny", temporal_window=3)
    assert enc.temporal_window == 4
    z = enc.encode_frames(random_frames(2 * 4).reshape(2, 4, 40, 56, 3))
    assert z.shape == (2, enc.dim)


@pytest.mark.parametrize("source", ["dino", "vjepa"])
def test_latent_of_frame_t_never_sees_a_later_frame(source):
    enc = build_encoder(source, dino_model="tiny", vjepa_model="tiny", pooling="cls", temporal_window=4)
    n, t0 = 12, 5
    frames = random_frames(n)
    later_changed = frames.clone()
    later_changed[t0 + 1:] = 255 - later_changed[t0 + 1:]
    rows = causal_window(np.arange(n), np.zeros(n, dtype=int), enc.temporal_window)
    za = enc.encode_frames(frames[torch.from_numpy(rows)])
    zb = enc.encode_frames(later_changed[torch.from_numpy(rows)])
    assert torch.equal(za[: t0 + 1], zb[: t0 + 1])
    assert not torch.allclose(za[t0 + 1:], zb[t0 + 1:])


def test_unknown_source_and_unloadable_model():
    from fplus.errors import FplusError

    with pytest.raises(FplusError, match="unknown world source 'clip'"):
        build_encoder("clip", dino_model="tiny", vjepa_model="tiny", pooling="cls", temporal_window=2)
    with pytest.raises(FplusError, match="cannot load world encoder.*tiny"):
        DinoEncoder("/nonexistent/dino-model")


def test_local_directory_loads_through_from_pretrained(tmp_path):
    enc = DinoEncoder("tiny")
    enc.model.save_pretrained(tmp_path / "dino")
    local = DinoEncoder(str(tmp_path / "dino"))
    frames = random_frames(2, 32, 32)[:, None]
    # a local model uses the hub preprocessing (224 crop); the weights are the same
    assert local.dim == enc.dim and local.preprocess.crop == 224
    torch.testing.assert_close(local.model(pixel_values=enc.preprocess(frames[:, -1])).pooler_output,
                               enc.model(pixel_values=enc.preprocess(frames[:, -1])).pooler_output)
