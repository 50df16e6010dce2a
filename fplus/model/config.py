"""PolicyConfig: everything needed to rebuild a policy, derived from the settings tree (never re-declared)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from fplus.errors import CheckpointError, ConfigError
from fplus.settings import ModelSettings, Settings


class PolicyConfig(BaseModel):
    """Everything needed to rebuild a policy (saved as config.json next to its weights), derived from the settings
    tree (`from_settings`): the MODEL section as the run resolved it, and what other sections and the dataset fix.

    model: ModelSettings (backbone, horizon, image size, fine-tuning, which parts exist, their sizes, loss weights,
        the action head: `model.action_head` is mse or flow, with FLOW_* and RTC_MAX_GUIDANCE).
    action_dim, state_dim (None: no state), world_dim (None: no world latents): the dataset's and the encoder's sizes.
    history, future: T and K latents (WORLD_HISTORY, WORLD_FUTURE). coc_mode: COC_MODE. init_seed: SEED.
    backbone_revision: the commit of the backbone's weights (hub ids), recorded so that a reload uses the same.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelSettings
    action_dim: int
    state_dim: int | None
    world_dim: int | None
    history: int
    future: int
    coc_mode: str
    init_seed: int
    backbone_revision: str | None = None

    @model_validator(mode="after")
    def _world_dim(self) -> PolicyConfig:
        m = self.model
        if (m.prophet or m.flare_align) and not self.world_dim:
            raise ConfigError("the Prophet and FLARE alignment need world latents (world_dim)")
        return self

    @property
    def num_fut_tokens(self) -> int:
        """M <FUT_j> tokens: one per future latent, only with FLARE alignment."""
        return self.future if self.model.flare_align else 0

    def resolved_align_layer(self, num_layers: int) -> int:
        """ALIGN_LAYER, or the middle decoder layer (1-based) when unset."""
        return self.model.align_layer or max(1, num_layers // 2)

    def check_loss_paths(self, num_layers: int) -> None:
        """Fail (ConfigError) when an active loss could reach no trainable weight of its path for a backbone of
        `num_layers` decoder layers. The added token rows always train; what can fail is FLARE alignment: its
        loss reads layer ALIGN_LAYER, so under LoRA at least one adapted layer must sit at or below it."""
        m = self.model
        if not m.flare_align:
            return
        layer = self.resolved_align_layer(num_layers)
        if not 1 <= layer <= num_layers:
            raise ConfigError(f"ALIGN_LAYER={layer} is out of range: the backbone has decoder layers 1..{num_layers}")
        if m.finetune == "lora":
            first = max(1, num_layers - m.lora_layers + 1)
            if layer < first:
                raise ConfigError(
                    f"ALIGN_LAYER={layer}{'' if m.align_layer else ' (unset: the middle layer)'} is below the "
                    f"first LoRA layer {first} (LORA_LAYERS={m.lora_layers} of {num_layers}): L_align could "
                    f"reach no adapted backbone weight. Set ALIGN_LAYER >= {first} or LORA_LAYERS >= "
                    f"{num_layers - layer + 1}")

    @classmethod
    def from_settings(cls, settings: Settings, action_dim: int, state_dim: int | None,
                      world_dim: int | None) -> PolicyConfig:
        """The config of the experiment described by a `Settings` tree and the dataset's dimensions."""
        m = settings.model
        return cls(model=m, action_dim=action_dim, state_dim=state_dim,
                   world_dim=world_dim if (m.prophet or m.flare_align) else None,
                   history=settings.world.history, future=settings.world.future, coc_mode=settings.coc.mode,
                   init_seed=settings.train.seed)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of config.json (and of the run's config.json `policy`)."""
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str | Path) -> PolicyConfig:
        """Parse `to_json` output; a config of the earlier flat layout (model fields at the top) is converted."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{where} is not a policy configuration (not a JSON object)")
        if "model" not in data:  # fplus <= 0.1: the model settings were flat next to the dimensions
            model = {k: data[k] for k in ModelSettings.model_fields if k in data}
            data = {k: v for k, v in data.items() if k not in ModelSettings.model_fields}
            data["model"] = model
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors()[:4])
            raise CheckpointError(f"{where} is not a policy configuration this fplus can load ({problems})") from None
