import numpy as np
import pytest
import torch

from fplus.data.windows import causal_window
from fplus.world.encoders import IMAGENET_MEAN, IMAGENET_STD, DinoEncoder, Preprocess, VJEPAEncoder, build_encoder


def random_frames(n, h=40, w=56, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def test_preprocess_resizes_crops_and_normalises():
    p = Preprocess(resize=32, crop=24, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    gray = torch.full((2, 40, 60, 3), 255, dtype=torch.uint8)
    x = p(gray)
    assert x.shape == (2, 3, 24, 24)
    torch.testing.assert_close(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
    # per channel, in RGB order: a constant colour survives the resize and is normalised channel by channel
    colour = torch.tensor([255, 0, 51], dtype=torch.uint8).expand(1, 40, 60, 3)
    imagenet = Preprocess(resize=32, crop=24)(colour)
    expected = [(c / 255 - m) / sd for c, m, sd in zip((255, 0, 51), IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    for channel, value in enumerate(expected):
        torch.testing.assert_close(imagenet[0, channel], torch.full((24, 24), value), rtol=0, atol=1e-5)
    # short side already at `resize`: no interpolation, the centre crop is the exact middle of the frame
    frames = random_frames(2, 24, 30)
    crop = Preprocess(resize=24, crop=24, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(frames)
    torch.testing.assert_close(crop, frames[:, :, 3:27].permute(0, 3, 1, 2).float() / 255, rtol=0, atol=1e-7)
    # the short side is resized to `resize`, keeping the aspect ratio: a 40 x 60 frame becomes 32 x 48, so a
    # vertical stripe at the centre column stays at the centre of the crop
    stripe = torch.zeros((1, 40, 60, 3), dtype=torch.uint8)
    stripe[:, :, 28:32] = 255
    profile = Preprocess(resize=32, crop=24, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))(stripe)[0, 0, 12]
    assert profile.argmax().item() in (11, 12) and profile[0].item() == profile[-1].item() == 0.0
    torch.testing.assert_close(profile, profile.flip(0), rtol=0, atol=1e-6)  # symmetric about the centre


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
    # independent computation from the model's tokens: [CLS, registers (DINOv3: 2), 16 patches of 8 px]
    with torch.no_grad():
        tokens = enc.model(pixel_values=enc.preprocess(frames[:, -1])).last_hidden_state
    assert tokens.shape[1] == 1 + (2 if "dinov3" in model_id else 0) + (32 // 8) ** 2
    expected = tokens[:, 0] if pooling == "cls" else tokens[:, -16:].mean(dim=1)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)
    # one frame at a time: a sample's latent does not depend on the rest of the batch
    torch.testing.assert_close(enc.encode_frames(frames[1:2]), z[1:2], rtol=1e-5, atol=1e-6)


def test_dino_pooling_differs():
    frames = random_frames(2)[:, None]
    assert not torch.allclose(DinoEncoder("tiny", "cls").encode_frames(frames),
                              DinoEncoder("tiny", "mean").encode_frames(frames))


def test_vjepa_shapes_window_rounded_to_tubelet():
    assert [VJEPAEncoder("tiny", temporal_window=m).temporal_window for m in (1, 2, 3, 5)] == [2, 2, 4, 6]
    enc = VJEPAEncoder("tiny", temporal_window=3)
    assert enc.temporal_window == 4
    clips = random_frames(2 * 4).reshape(2, 4, 40, 56, 3)
    z = enc.encode_frames(clips)
    assert z.shape == (2, enc.dim)
    # independent computation: the mean of the encoder's 2 tubelets x 16 patches, every frame preprocessed alone
    x = torch.stack([enc.preprocess(clip) for clip in clips])  # (B, T, C, H, W)
    with torch.no_grad():
        tokens = enc.model(pixel_values_videos=x, skip_predictor=True).last_hidden_state
    assert tokens.shape[1] == (4 // 2) * (32 // 8) ** 2
    torch.testing.assert_close(z, tokens.mean(dim=1), rtol=1e-5, atol=1e-6)
    # every frame of the clip counts, the first one too
    first_changed = clips.clone()
    first_changed[:, 0] = 255 - first_changed[:, 0]
    assert not torch.allclose(enc.encode_frames(first_changed), z)


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
