"""Training-time image augmentation (fplus.model.augment): each op on synthetic images, identity when off, seeding."""

import math

import pytest
import torch
import torch.nn.functional as F

from fplus.errors import ConfigError
from fplus.model.augment import (
    AugmentConfig,
    Draw,
    ImageAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    affine,
    augment_images,
    hsv_to_rgb,
    luma,
    rgb_to_hsv,
)
from fplus.settings import load_settings

PRESET = AugmentConfig(crop_scale=(0.85, 1.0), shift=0.04, rotation=5.0, brightness=0.2, contrast=0.2,
                       saturation=0.2, hue=0.05)
IDENTITY = Draw(side=1.0, cx=0.0, cy=0.0, angle=0.0, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0)


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def uint8(*shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def geometry(x, side=1.0, cx=0.0, cy=0.0, angle=0.0):
    n = x.shape[0]
    return affine(x, torch.full((n,), side), torch.full((n,), cx), torch.full((n,), cy), torch.full((n,), angle))


def test_all_ranges_zero_is_the_identity_bit_for_bit():
    off = ImageAugment(AugmentConfig(), seed=3)
    for images in (uint8(4, 2, 20, 30, 3), rand(4, 20, 30, 3)):
        out = off(images, [5, 6, 7, 8], epoch=2)
        assert out.dtype == images.dtype and torch.equal(out, images)
    x = rand(3, 3, 16, 16)
    assert torch.equal(geometry(x, side=1.0), x)  # a crop of scale 1 without shift or rotation


def test_rotation_by_90_degrees_is_rot90():
    x = rand(2, 3, 12, 12)
    torch.testing.assert_close(geometry(x, angle=90.0), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(geometry(x, angle=-90.0), torch.rot90(x, -1, dims=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(geometry(x, angle=180.0), torch.rot90(x, 2, dims=(2, 3)), atol=1e-5, rtol=0)
    images = uint8(1, 12, 12, 3)  # through the uint8 path: rounding removes the interpolation error
    rotated = augment_images(images, [Draw(**{**IDENTITY.__dict__, "angle": 90.0})])
    assert torch.equal(rotated, torch.rot90(images, 1, dims=(1, 2)))


def test_rotation_of_a_non_square_image_keeps_shapes_round():
    """Rotation is in pixel units: a centred disc on a 2:1 image stays a disc (no shear)."""
    h, w = 32, 64
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5 - h / 2, torch.arange(w) + 0.5 - w / 2, indexing="ij")
    disc = ((xx**2 + yy**2) < 10**2).float().expand(1, 3, h, w)
    turned = geometry(disc, angle=37.0)
    assert (turned - disc).abs().mean() < 0.01


def test_shift_moves_the_content_by_whole_pixels():
    x = rand(2, 3, 8, 8)
    right = geometry(x, cx=2 / 8)  # the window moves one pixel right: the content one pixel left
    assert torch.equal(right[..., :-1], x[..., 1:])
    assert torch.equal(right[..., -1], x[..., -1])  # edges replicated
    down = geometry(x, cy=-2 / 8)
    assert torch.equal(down[..., 1:, :], x[..., :-1, :]) and torch.equal(down[..., 0, :], x[..., 0, :])


def test_centre_crop_is_a_bilinear_zoom():
    x = rand(1, 3, 16, 16)
    crop = geometry(x, side=0.5)  # scale 0.25 of the area: the centre 8 x 8 pixels, zoomed x2
    zoom = F.interpolate(x[..., 4:12, 4:12], scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(crop[..., 1:-1, 1:-1], zoom[..., 1:-1, 1:-1], atol=1e-6, rtol=0)


def test_brightness_scales_the_mean_and_clamps():
    x = 0.2 + 0.2 * rand(2, 3, 10, 10)
    out = adjust_brightness(x, torch.tensor([1.5, 0.5]))
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)) * torch.tensor([1.5, 0.5]))
    assert adjust_brightness(x, torch.tensor([4.0, 4.0])).max() == 1.0


def test_contrast_scales_deviations_from_the_mean_luma():
    x = 0.3 + 0.4 * rand(1, 3, 10, 10)
    mean = luma(x).mean()
    flat = adjust_contrast(x, torch.tensor([0.0]))
    torch.testing.assert_close(flat, torch.full_like(x, float(mean)))
    doubled = adjust_contrast(0.4 + 0.2 * (x - 0.3), torch.tensor([2.0]))  # stays inside [0, 1]
    base = 0.4 + 0.2 * (x - 0.3)
    torch.testing.assert_close(doubled - luma(base).mean(), 2 * (base - luma(base).mean()), atol=1e-6, rtol=0)


def test_saturation_zero_is_grayscale_and_grays_do_not_change():
    x = rand(2, 3, 10, 10)
    gray = adjust_saturation(x, torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(gray, luma(x).expand_as(x))
    level = torch.full((1, 3, 4, 4), 0.4)
    torch.testing.assert_close(adjust_saturation(level, torch.tensor([1.8])), level)


def test_hue_rotates_the_colour_circle():
    red = torch.zeros(1, 3, 4, 4)
    red[:, 0] = 1.0
    colour = lambda shift: adjust_hue(red, torch.tensor([shift]))[0, :, 0, 0].tolist()  # noqa: E731
    assert colour(1 / 3) == pytest.approx([0, 1, 0], abs=1e-6)  # red -> green
    assert colour(2 / 3) == pytest.approx([0, 0, 1], abs=1e-6)  # -> blue
    assert colour(0.5) == pytest.approx([0, 1, 1], abs=1e-6)  # -> cyan
    assert colour(-1 / 6) == pytest.approx([1, 0, 1], abs=1e-6)  # -> magenta
    x = rand(2, 3, 10, 10)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=2e-6, rtol=0)
    hsv = rgb_to_hsv(x)
    assert hsv.min() >= 0 and hsv.max() <= 1
    torch.testing.assert_close(rgb_to_hsv(adjust_hue(x, torch.tensor([0.1, 0.1])))[:, 1:], hsv[:, 1:], atol=2e-6,
                               rtol=0)  # saturation and value kept
    level = torch.full((1, 3, 4, 4), 0.6)
    torch.testing.assert_close(adjust_hue(level, torch.tensor([0.3])), level)  # grays have no hue


def test_draws_follow_the_ranges():
    aug = ImageAugment(PRESET, seed=0)
    draws = [aug.draw(epoch, i, c) for epoch in range(3) for i in range(100) for c in range(2)]
    assert all(0.85 - 1e-12 <= d.side**2 <= 1.0 for d in draws)
    assert all(abs(d.cx) <= 1 - d.side + 0.08 + 1e-12 and abs(d.cy) <= 1 - d.side + 0.08 + 1e-12 for d in draws)
    assert all(abs(d.angle) <= 5 and abs(d.hue) <= 0.05 for d in draws)
    assert all(0.8 <= f <= 1.2 for d in draws for f in (d.brightness, d.contrast, d.saturation))
    assert max(abs(d.angle) for d in draws) > 4.5 and max(d.brightness for d in draws) > 1.18  # the whole range
    centred = ImageAugment(AugmentConfig(crop_scale=(0.5, 0.5)), seed=0)
    assert all(abs(centred.draw(0, i, 0).cx) <= 1 - math.sqrt(0.5) for i in range(100))  # window inside


def test_draws_depend_on_seed_epoch_sample_and_camera_only():
    images = uint8(3, 2, 24, 24, 3)
    aug = ImageAugment(PRESET, seed=7)
    out = aug(images, [10, 11, 12], epoch=1)
    assert torch.equal(out, ImageAugment(PRESET, seed=7)(images, [10, 11, 12], epoch=1))  # deterministic
    assert torch.equal(aug(images[1:], [11, 12], epoch=1), out[1:])  # not the batch's composition
    assert not torch.equal(out, images)
    assert not torch.equal(ImageAugment(PRESET, seed=8)(images, [10, 11, 12], epoch=1), out)  # another seed
    assert not torch.equal(aug(images, [10, 11, 12], epoch=2), out)  # another epoch
    assert aug.draw(1, 10, 0) != aug.draw(1, 10, 1) != aug.draw(1, 11, 0)  # each camera, each sample
    same = images[:, :1].expand(-1, 2, -1, -1, -1).contiguous()  # both cameras the same frame
    twin = aug(same, [10, 11, 12], epoch=1)
    assert not torch.equal(twin[:, 0], twin[:, 1])
    single = aug(images[:, 0], [10, 11, 12], epoch=1)  # (B, H, W, 3): camera 0
    assert torch.equal(single, out[:, 0])


def test_float_images_stay_float_in_range():
    images = rand(2, 16, 16, 3)
    out = ImageAugment(PRESET, seed=0)(images, [0, 1], epoch=0)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, images)
    as_uint8 = ImageAugment(PRESET, seed=0)((images * 255).round().to(torch.uint8), [0, 1], epoch=0)
    assert (as_uint8.float() - out * 255).abs().max() <= 3  # the same draws whatever the dtype


def test_bad_inputs_fail_clearly():
    aug = ImageAugment(PRESET, seed=0)
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\) or \(B, C, H, W, 3\)"):
        aug(uint8(2, 3, 16, 16), [0, 1], epoch=0)
    with pytest.raises(ValueError, match="1 sample indices for a batch of 2"):
        aug(uint8(2, 16, 16, 3), [0], epoch=0)


def test_settings_choose_and_validate_the_augmentation():
    def settings(**values):
        return load_settings(None, {k: str(v) for k, v in values.items()}, environ={}, dotenv=None)

    assert ImageAugment.from_settings(settings().data, seed=0) is None  # AUGMENT=none is the default
    preset = ImageAugment.from_settings(settings(AUGMENT="default").data, seed=4)
    assert preset.config == PRESET and preset.seed == 4  # the documented preset
    custom = ImageAugment.from_settings(settings(AUGMENT="default", AUG_ROTATION=0, AUG_HUE=0.1).data, seed=0)
    assert custom.config.rotation == 0 and custom.config.hue == 0.1
    with pytest.raises(ConfigError, match="AUG_CROP_SCALE_MIN=0.9 is above AUG_CROP_SCALE_MAX=0.5"):
        settings(AUG_CROP_SCALE_MIN=0.9, AUG_CROP_SCALE_MAX=0.5)
    for key, value in (("AUG_HUE", 0.6), ("AUG_CROP_SCALE_MIN", 0), ("AUG_ROTATION", -1), ("AUG_SHIFT", 0.7),
                       ("AUG_BRIGHTNESS", 1.5), ("AUGMENT", "strong")):
        with pytest.raises(ConfigError, match=key):
            settings(**{key: value})
