"""Training-time image augmentation in pure torch: random resized crop + shift + small rotation, then colour jitter.

    augment = ImageAugment.from_settings(settings.data, seed=settings.train.seed)   # None when AUGMENT=none
    images  = augment(images, indices, epoch)     # (B, H, W, 3) or (B, C, H, W, 3), uint8 or float in [0, 1]

Only the training collate (`fplus.train.data.Collate(augment=...)`) calls it, before the policy's processor;
the processor itself never augments, so validation, offline eval, the closed loop and the server see raw frames.

Each image (one camera of one sample) gets its own draw from a numpy generator seeded by
(SEED, epoch, sample index, camera) alone: the same batch comes out whatever the number of DataLoader workers or
processes, and a resumed run draws what the uninterrupted one drew. The sample index is the frame's global row
(`batch["index"]`), so one frame is augmented differently in each epoch.

The ops, in this fixed order, on float images (N, 3, H, W) in [0, 1] (clamped after each colour op):
    geometry    one bilinear `grid_sample` (edges replicated) of a window of side sqrt(scale) x the image side,
                scale ~ U(AUG_CROP_SCALE_MIN, AUG_CROP_SCALE_MAX), placed uniformly inside the image, moved by
                a further shift ~ U(-AUG_SHIFT, AUG_SHIFT) x the side on each axis, and rotated about its centre by
                ~ U(-AUG_ROTATION, AUG_ROTATION) degrees (positive: counter-clockwise as displayed); the output
                keeps the input's size (the processor resizes it afterwards)
    brightness  x * b,                      b ~ U(1 - AUG_BRIGHTNESS, 1 + AUG_BRIGHTNESS)
    contrast    (x - m) * c + m,            c ~ U(1 - AUG_CONTRAST, 1 + AUG_CONTRAST), m the image's mean luma
    saturation  (x - y) * s + y,            s ~ U(1 - AUG_SATURATION, 1 + AUG_SATURATION), y each pixel's luma
    hue         RGB -> HSV, H + h mod 1, HSV -> RGB,   h ~ U(-AUG_HUE, AUG_HUE) turns of the colour circle
Luma is ITU-R BT.601 (0.299 R + 0.587 G + 0.114 B). An op whose draw is the identity (factor 1, shift 0, ...)
leaves its image untouched bit for bit, so AUG_* = 0 is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)
"""ITU-R BT.601 weights of R, G, B in the grayscale of contrast and saturation."""
DRAWS = 10
"""Uniforms drawn per image (always all of them, so one parameter's range never changes another's draw):
scale, window x, window y, shift x, shift y, angle, brightness, contrast, saturation, hue -> see `ImageAugment.draw`."""


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the draws (the AUG_* settings; see the module docstring for what each does)."""

    crop_scale: tuple[float, float] = (1.0, 1.0)
    shift: float = 0.0
    rotation: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0


@dataclass(frozen=True)
class Draw:
    """The augmentation of one image: window side `side` (sqrt of the area scale), window centre (cx, cy) in
    normalised coordinates ([-1, 1], shift included), `angle` in degrees, colour factors and the hue shift."""

    side: float
    cx: float
    cy: float
    angle: float
    brightness: float
    contrast: float
    saturation: float
    hue: float


class ImageAugment:
    """Seeded per-image augmentation of a batch (see the module docstring).

    Args:
        config: the draw ranges. seed: the training SEED.
    """

    def __init__(self, config: AugmentConfig, seed: int):
        self.config = config
        self.seed = seed

    @classmethod
    def from_settings(cls, data: Any, seed: int) -> ImageAugment | None:
        """The augmentation of a DataSettings section (AUGMENT, AUG_*), or None when AUGMENT=none."""
        if data.augment == "none":
            return None
        return cls(AugmentConfig(crop_scale=(data.aug_crop_scale_min, data.aug_crop_scale_max), shift=data.aug_shift,
                                 rotation=data.aug_rotation, brightness=data.aug_brightness,
                                 contrast=data.aug_contrast, saturation=data.aug_saturation, hue=data.aug_hue), seed)

    def draw(self, epoch: int, index: int, camera: int) -> Draw:
        """The draw of camera `camera` of the sample at global frame row `index` in epoch `epoch`: a function of
        (seed, epoch, index, camera) only."""
        key = np.random.SeedSequence([self.seed % 2**64, epoch, index, camera])
        u = np.random.default_rng(key).random(DRAWS).tolist()
        c = self.config
        lo, hi = c.crop_scale
        side = math.sqrt(lo + (hi - lo) * u[0])
        room = 1.0 - side  # the window's centre can move this far (normalised) and stay inside the image
        cx = room * (2 * u[1] - 1) + 2 * c.shift * (2 * u[3] - 1)
        cy = room * (2 * u[2] - 1) + 2 * c.shift * (2 * u[4] - 1)
        return Draw(side=side, cx=cx, cy=cy, angle=c.rotation * (2 * u[5] - 1),
                    brightness=1 + c.brightness * (2 * u[6] - 1), contrast=1 + c.contrast * (2 * u[7] - 1),
                    saturation=1 + c.saturation * (2 * u[8] - 1), hue=c.hue * (2 * u[9] - 1))

    def __call__(self, images: torch.Tensor, indices: list[int], epoch: int) -> torch.Tensor:
        """Augment every camera of every sample.

        Args:
            images: (B, H, W, 3) or (B, C, H, W, 3), uint8 (0..255) or float (0..1), channels last.
            indices: B global frame rows (the batch's "index"). epoch: the training epoch.
        Returns:
            the augmented images, same shape and dtype (uint8 rounded).
        """
        if images.dim() not in (4, 5) or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3) or (B, C, H, W, 3), got {tuple(images.shape)}")
        if len(indices) != images.shape[0]:
            raise ValueError(f"{len(indices)} sample indices for a batch of {images.shape[0]}")
        cams = 1 if images.dim() == 4 else images.shape[1]
        draws = [self.draw(epoch, int(i), c) for i in indices for c in range(cams)]  # sample-major, as reshape
        flat = images.reshape(-1, *images.shape[-3:])
        out = augment_images(flat, draws)
        return out.reshape(images.shape)


def augment_images(images: torch.Tensor, draws: list[Draw]) -> torch.Tensor:
    """(N, H, W, 3) uint8 or float in [0, 1] with N draws -> the augmented images, same shape and dtype."""
    is_uint8 = images.dtype == torch.uint8
    x = images.permute(0, 3, 1, 2).to(torch.float32)
    x = x / 255.0 if is_uint8 else x
    column = lambda values: torch.tensor(values, dtype=torch.float32)  # noqa: E731
    x = affine(x, column([d.side for d in draws]), column([d.cx for d in draws]), column([d.cy for d in draws]),
               column([d.angle for d in draws]))
    x = adjust_brightness(x, column([d.brightness for d in draws]))
    x = adjust_contrast(x, column([d.contrast for d in draws]))
    x = adjust_saturation(x, column([d.saturation for d in draws]))
    x = adjust_hue(x, column([d.hue for d in draws]))
    x = x.permute(0, 2, 3, 1)
    if is_uint8:
        return (x * 255.0).round().clamp(0, 255).to(torch.uint8).contiguous()
    return x.to(images.dtype).contiguous()


# ----- the ops: (N, 3, H, W) float in [0, 1] and one parameter (N,) per image ------------------------------------


def _keep(identity: torch.Tensor, x: torch.Tensor, op) -> torch.Tensor:
    """op(x) where `identity` (N,) bool is False, x itself (bit for bit) where it is True; op skipped if all are."""
    if bool(identity.all()):
        return x
    return torch.where(identity[:, None, None, None], x, op(x))


def affine(x: torch.Tensor, side: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, angle: torch.Tensor
           ) -> torch.Tensor:
    """Resample a rotated square-ish window of each image to the full size (bilinear, edges replicated).

    Args:
        x: (N, 3, H, W). side: (N,) window side as a fraction of the image side (1: the whole image).
        cx, cy: (N,) window centre in normalised coordinates (-1 left/top edge, 1 right/bottom edge).
        angle: (N,) degrees, positive = counter-clockwise as displayed (90 on a square image = torch.rot90 of
            the (H, W) plane).
    Returns:
        (N, 3, H, W).
    """
    n, _, h, w = x.shape
    identity = (side == 1) & (cx == 0) & (cy == 0) & (angle == 0)

    def op(x: torch.Tensor) -> torch.Tensor:
        # output pixel centres in normalised coordinates (align_corners=False), built elementwise (no BLAS)
        u = ((2 * torch.arange(w, dtype=torch.float32) + 1) / w - 1).view(1, 1, w)
        v = ((2 * torch.arange(h, dtype=torch.float32) + 1) / h - 1).view(1, h, 1)
        rad = [math.radians(a) for a in angle.tolist()]  # Python floats: the same on every machine and thread
        cos = torch.tensor([math.cos(a) for a in rad], dtype=torch.float32).view(n, 1, 1)
        sin = torch.tensor([math.sin(a) for a in rad], dtype=torch.float32).view(n, 1, 1)
        r = side.view(n, 1, 1)
        # rotate in pixel units (so that a non-square image is not sheared): input = centre + r * R(angle) output
        gx = cx.view(n, 1, 1) + r * (cos * u - sin * v * (h / w))
        gy = cy.view(n, 1, 1) + r * (sin * u * (w / h) + cos * v)
        grid = torch.stack([gx.expand(n, h, w), gy.expand(n, h, w)], dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return _keep(identity, x, op)


def luma(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) BT.601 grayscale."""
    return LUMA[0] * x[:, 0:1] + LUMA[1] * x[:, 1:2] + LUMA[2] * x[:, 2:3]


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W), factor (N,) -> x * factor, clamped to [0, 1]."""
    return _keep(factor == 1, x, lambda x: (x * factor.view(-1, 1, 1, 1)).clamp(0, 1))


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W), factor (N,) -> blend with the image's mean luma: (x - m) * factor + m, clamped."""

    def op(x: torch.Tensor) -> torch.Tensor:
        mean = luma(x).mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * factor.view(-1, 1, 1, 1) + mean).clamp(0, 1)

    return _keep(factor == 1, x, op)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W), factor (N,) -> blend with each pixel's luma: (x - y) * factor + y, clamped (0: grayscale)."""

    def op(x: torch.Tensor) -> torch.Tensor:
        gray = luma(x)
        return ((x - gray) * factor.view(-1, 1, 1, 1) + gray).clamp(0, 1)

    return _keep(factor == 1, x, op)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W), shift (N,) in turns -> hue rotated by `shift` in HSV (1/3: red -> green)."""

    def op(x: torch.Tensor) -> torch.Tensor:
        h, s, v = rgb_to_hsv(x).unbind(1)
        h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
        return hsv_to_rgb(torch.stack([h, s, v], dim=1)).clamp(0, 1)

    return _keep(shift == 0, x, op)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> (N, 3, H, W) HSV, each in [0, 1] (hue in turns; 0 for grays)."""
    r, g, b = x.unbind(1)
    maxc = x.amax(dim=1)
    delta = maxc - x.amin(dim=1)
    s = delta / torch.where(maxc > 0, maxc, 1.0)
    d = torch.where(delta > 0, delta, 1.0)  # grays: every distance below is 0, so the hue is 0
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    return torch.stack([torch.remainder(h / 6.0, 1.0), s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) HSV in [0, 1] (hue in turns) -> (N, 3, H, W) RGB in [0, 1].

    Closed form per channel n = 5 (R), 3 (G), 1 (B): v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6."""
    h, s, v = x.unbind(1)
    h6, vs = h * 6.0, v * s
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h6 + n, 6.0)
        channels.append(v - vs * torch.minimum(k, 4.0 - k).clamp(0, 1))
    return torch.stack(channels, dim=1)
