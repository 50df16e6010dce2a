"""World-latent encoders (DESIGN 4): DINOv2 / DINOv3 per frame, V-JEPA 2 over a causal clip.

Both map frames to one vector per frame t that depends on frames <= t only:
    dino:  z_t = pool(Dinov2Model(frame_t))                       pooled CLS token or mean of patch tokens
    vjepa: z_t = mean(VJEPA2Model(frames[t-m+1 .. t]))            clip repeat-padded at the episode start
Never encode a context and its future in one bidirectional pass: that leaks the future into the history.

Preprocessing is torch only (no torchvision): resize the short side, centre crop, normalise.
`tiny` builds a small random-initialised model from a fixed seed, so two runs give the same weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from fplus.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY = "tiny"
TINY_SEED = 0


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to `resize`, centre-crop `crop` x `crop`, normalise with `mean`/`std` (RGB)."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, crop, crop) float32."""
        x = frames.permute(0, 3, 1, 2).float().div_(255.0)
        h, w = x.shape[-2:]
        scale = self.resize / min(h, w)
        size = (max(self.crop, round(h * scale)), max(self.crop, round(w * scale)))
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        x = x[:, :, top:top + self.crop, left:left + self.crop]
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std


def _tiny_dino_config(dinov3: bool):
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  image_size=32, patch_size=8)
    if dinov3:
        from transformers import DINOv3ViTConfig

        return DINOv3ViTConfig(num_register_tokens=2, **common)
    from transformers import Dinov2Config

    common.pop("intermediate_size")
    return Dinov2Config(mlp_ratio=2, **common)


def _tiny_vjepa_config():
    from transformers import VJEPA2Config

    return VJEPA2Config(crop_size=32, frames_per_clip=8, tubelet_size=2, patch_size=8, hidden_size=32,
                        num_attention_heads=2, num_hidden_layers=2, pred_hidden_size=16,
                        pred_num_attention_heads=2, pred_num_hidden_layers=1, num_pooler_layers=1)


def _random_config(model_id: str):
    """Configs built with random weights: `tiny` test models, and full-size architectures for speed benchmarks."""
    from transformers import Dinov2Config, DINOv3ViTConfig, VJEPA2Config

    configs = {
        TINY: lambda: _tiny_dino_config(False),
        f"{TINY}-dinov3": lambda: _tiny_dino_config(True),
        f"{TINY}-vjepa": _tiny_vjepa_config,
        "random-dinov2-base": Dinov2Config,  # the facebook/dinov2-base architecture
        "random-dinov3-vitb16": lambda: DINOv3ViTConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                        num_register_tokens=4),
        "random-vjepa2-vitl": VJEPA2Config,  # the facebook/vjepa2-vitl-fpc64-256 architecture
    }
    return configs[model_id]() if model_id in configs else None


def _config_digest(config) -> str:
    d = config.to_dict()
    d.pop("transformers_version", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


class WorldEncoder(torch.nn.Module):
    """Common interface. `encode_frames(frames (B, m, H, W, 3) uint8) -> (B, D) float32` where m is the
    clip length (`temporal_window`, 1 for dino) and the last frame of each clip is frame t."""

    source: Literal["dino", "vjepa"]
    model_id: str
    revision: str
    dim: int
    temporal_window: int
    preprocess: Preprocess

    def describe(self) -> dict:
        """What the manifest records about the encoder."""
        return {"source": self.source, "encoder_id": self.model_id, "revision": self.revision, "dim": self.dim,
                "temporal_window": self.temporal_window, "preprocess": asdict(self.preprocess),
                **self._extra()}

    def _extra(self) -> dict:
        return {}

    @torch.no_grad()
    def encode_frames(self, clips: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DinoEncoder(WorldEncoder):
    """DINOv2 (`Dinov2Model`) or DINOv3 (`DINOv3ViTModel`), one frame at a time.

    Args:
        model_id: hub id, local directory, `tiny` (DINOv2-shaped) / `tiny-dinov3`, or a random full-size
            architecture for benchmarks (`random-dinov2-base`, `random-dinov3-vitb16`).
        pooling: `cls` (the layer-normed CLS token) or `mean` (mean of the patch tokens, registers excluded).
    """

    source = "dino"

    def __init__(self, model_id: str, pooling: Literal["cls", "mean"] = "cls", device: str = "cpu"):
        super().__init__()
        self.model_id = model_id
        self.pooling = pooling
        self.temporal_window = 1
        config = _random_config(model_id)
        if config is not None:
            torch.manual_seed(TINY_SEED)
            self.model = _dino_class(config.model_type)(config)
            self.revision = f"random-init-seed{TINY_SEED}-{_config_digest(config)}"
            self.preprocess = Preprocess(resize=config.image_size, crop=config.image_size)
        else:
            from transformers import AutoConfig

            config = _load(AutoConfig.from_pretrained, model_id)
            cls = _dino_class(config.model_type)
            self.model = _load(cls.from_pretrained, model_id)
            self.revision = getattr(self.model.config, "_commit_hash", None) or _config_digest(config)
            # DINOv2's processor resizes to 256 and crops 224; DINOv3's resizes straight to 224.
            self.preprocess = Preprocess(resize=224, crop=224) if config.model_type == "dinov3_vit" \
                else Preprocess(resize=256, crop=224)
        self.num_registers = getattr(self.model.config, "num_register_tokens", 0) or 0
        self.dim = self.model.config.hidden_size
        self.model.to(device).eval()
        self.device = torch.device(device)

    def _extra(self) -> dict:
        return {"pooling": self.pooling, "model_type": self.model.config.model_type}

    @torch.no_grad()
    def encode_frames(self, clips: torch.Tensor) -> torch.Tensor:
        """clips (B, 1, H, W, 3) uint8 -> (B, D) float32."""
        x = self.preprocess(clips[:, -1]).to(self.device)
        out = self.model(pixel_values=x)
        if self.pooling == "cls":
            z = out.pooler_output
        else:
            z = out.last_hidden_state[:, 1 + self.num_registers:].mean(dim=1)
        return z.float().cpu()


def _dino_class(model_type: str):
    from transformers import Dinov2Model, DINOv3ViTModel

    classes = {"dinov2": Dinov2Model, "dinov3_vit": DINOv3ViTModel}
    if model_type not in classes:
        raise ConfigError(f"world encoder model_type {model_type!r} is not a DINO model ({', '.join(classes)})")
    return classes[model_type]


class VJEPAEncoder(WorldEncoder):
    """V-JEPA 2 (`VJEPA2Model`, encoder only) over the clip of the last m frames ending at t, mean-pooled.

    Args:
        model_id: hub id, local directory, `tiny`, or `random-vjepa2-vitl` (random full-size, for benchmarks).
        temporal_window: m, frames per clip (rounded up to a multiple of the tubelet size, 2).
    """

    source = "vjepa"

    def __init__(self, model_id: str, temporal_window: int, device: str = "cpu"):
        super().__init__()
        self.model_id = model_id
        from transformers import VJEPA2Model

        config = _random_config(f"{TINY}-vjepa" if model_id == TINY else model_id)
        if config is not None:
            torch.manual_seed(TINY_SEED)
            self.model = VJEPA2Model(config)
            self.revision = f"random-init-seed{TINY_SEED}-{_config_digest(config)}"
        else:
            self.model = _load(VJEPA2Model.from_pretrained, model_id)
            config = self.model.config
            self.revision = getattr(config, "_commit_hash", None) or _config_digest(config)
        tubelet = config.tubelet_size
        self.temporal_window = -(-temporal_window // tubelet) * tubelet
        crop = config.crop_size
        self.preprocess = Preprocess(resize=crop if model_id == TINY else round(crop * 256 / 224), crop=crop)
        self.dim = config.hidden_size
        self.model.to(device).eval()
        self.device = torch.device(device)

    @torch.no_grad()
    def encode_frames(self, clips: torch.Tensor) -> torch.Tensor:
        """clips (B, m, H, W, 3) uint8 -> (B, D) float32 (mean of the encoder's tokens)."""
        b, m = clips.shape[:2]
        x = self.preprocess(clips.reshape(b * m, *clips.shape[2:]))
        x = x.reshape(b, m, *x.shape[1:]).to(self.device)  # (B, T, C, H, W)
        out = self.model(pixel_values_videos=x, skip_predictor=True)
        return out.last_hidden_state.mean(dim=1).float().cpu()


def _load(fn, model_id: str):
    try:
        return fn(model_id)
    except OSError as err:
        raise ConfigError(f"cannot load world encoder {model_id!r}: {err}. Offline? Use a local directory, "
                         f"or `tiny` for a random test encoder") from err


def build_encoder(source: str, *, dino_model: str, vjepa_model: str, pooling: str, temporal_window: int,
                  device: str = "cpu") -> WorldEncoder:
    """The encoder named by the world settings."""
    if source == "dino":
        return DinoEncoder(dino_model, pooling=pooling, device=device)
    if source == "vjepa":
        return VJEPAEncoder(vjepa_model, temporal_window=temporal_window, device=device)
    raise ConfigError(f"unknown world source {source!r}; valid: dino, vjepa")
