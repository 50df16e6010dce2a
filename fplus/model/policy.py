"""FPlusPolicy: the F+ vision-language-action policy, composed of one backbone and the parts of DESIGN 5.

    prompt  = image(s) + instruction + [<STATE>] [<FUT_0..M-1>] <ACT_0..H-1> [CoC text]
    act_h   = backbone hidden states at the ACT tokens                          (B, H, d)
    z_pred  = Prophet(z_hist)                                                    (B, K, D)       E1 E2 E4
    act_h   = act_h + tanh(gate) * CrossAttn(act_h, memory)                      memory: z_pred  E2 E4
    actions = ActionHead(act_h)                                                  (B, H, A)
    L = L_action + lambda_world L_world + lambda_text L_text + lambda_align L_align

During training the injected memory is the true future (oracle) with probability p_oracle per sample (scheduled
sampling, the training loop anneals it), else the prediction. At evaluation a corruption mode replaces it.
The CoC text never feeds the action path: in `joint_after_act` it follows the ACT tokens in a causal sequence.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fplus import batch as K
from fplus.errors import FplusError
from fplus.model.action_head import ActionHead
from fplus.model.align import FutureAlignment
from fplus.model.backbone import Backbone, load_backbone
from fplus.model.corruption import corrupt_memory
from fplus.model.injection import GatedCrossAttention
from fplus.model.normalize import Normalizer
from fplus.model.prompt import PromptBatch, PromptBuilder
from fplus.model.prophet import Prophet, world_loss

CONFIG_FILE = "config.json"
HEADS_FILE = "policy.safetensors"
BACKBONE_FILE = "backbone_trainable.safetensors"
PROCESSOR_DIR = "processor"


@dataclass(frozen=True)
class PolicyConfig:
    """Everything needed to rebuild a policy (saved as config.json next to its weights)."""

    backbone: str
    action_dim: int
    action_horizon: int
    image_size: int
    state_dim: int | None = None
    world_dim: int | None = None
    history: int = 4
    future: int = 4
    prophet: bool = False
    injection: bool = False
    flare_align: bool = False
    coc: bool = False
    coc_mode: str = "joint_after_act"
    align_layer: int | None = None
    prophet_width: int = 256
    prophet_layers: int = 2
    prophet_heads: int = 4
    prophet_delta: bool = False
    injection_heads: int = 4
    lambda_world: float = 1.0
    lambda_text: float = 0.1
    lambda_align: float = 0.5
    finetune: str = "full"
    lora_rank: int = 16
    lora_layers: int = 8
    gradient_checkpointing: bool = False
    normalization: str = "mean_std"

    def __post_init__(self):
        if self.injection and not self.prophet:
            raise FplusError("injection needs the Prophet (PROPHET=true)")
        if (self.prophet or self.flare_align) and not self.world_dim:
            raise FplusError("the Prophet and FLARE alignment need world latents (world_dim)")
        if self.finetune not in ("full", "frozen", "lora"):
            raise FplusError(f"unknown FINETUNE {self.finetune!r}; valid: full, frozen, lora")

    @property
    def num_fut_tokens(self) -> int:
        """M <FUT_j> tokens: one per future latent, only with FLARE alignment."""
        return self.future if self.flare_align else 0

    @classmethod
    def from_settings(cls, settings, action_dim: int, state_dim: int | None, world_dim: int | None) -> PolicyConfig:
        """The config of the experiment described by a `Settings` tree and the dataset's dimensions."""
        m, w, t, c = settings.model, settings.world, settings.train, settings.coc
        return cls(
            backbone=m.backbone, action_dim=action_dim, action_horizon=m.action_horizon, image_size=m.image_size,
            state_dim=state_dim, world_dim=world_dim if (m.prophet or m.flare_align) else None,
            history=w.history, future=w.future, prophet=m.prophet, injection=m.injection,
            flare_align=m.flare_align, coc=m.coc, coc_mode=c.mode, align_layer=m.align_layer,
            prophet_width=m.prophet_width, prophet_layers=m.prophet_layers, prophet_heads=m.prophet_heads,
            prophet_delta=m.prophet_delta, injection_heads=m.injection_heads,
            lambda_world=t.lambda_world, lambda_text=t.lambda_text, lambda_align=t.lambda_align,
            finetune=m.finetune, lora_rank=m.lora_rank, lora_layers=m.lora_layers,
            gradient_checkpointing=m.gradient_checkpointing, normalization=m.normalization,
        )


def apply_finetune(backbone: Backbone, mode: str, lora_rank: int, lora_layers: int,
                   gradient_checkpointing: bool) -> None:
    """Set which backbone weights train: `full` (all), `frozen` (none) or `lora` (peft LoRA on the attention and
    MLP projections of the last `lora_layers` decoder layers; everything else frozen)."""
    if gradient_checkpointing:  # renamed in transformers 5.2x; older 5.x only has the gradient_* name
        kwargs = {"use_reentrant": False}
        if hasattr(backbone.model, "activation_checkpointing_enable"):
            backbone.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            backbone.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode == "full":
        backbone.model.requires_grad_(True)
        return
    backbone.model.requires_grad_(False)
    if mode == "frozen":
        return
    from peft import LoraConfig, get_peft_model

    first = max(0, backbone.num_layers - lora_layers)
    layer_ids = "|".join(str(i) for i in range(first, backbone.num_layers))
    target = (rf".*language_model\.layers\.({layer_ids})\."
              r"(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")
    config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0, target_modules=target,
                        bias="none", init_lora_weights=True)
    backbone.model = get_peft_model(backbone.model, config)


class FPlusPolicy(nn.Module):
    """The policy. Build with `FPlusPolicy.build(config, stats)`; reload with `FPlusPolicy.load(dir)`.

    Args:
        config: PolicyConfig. backbone: a loaded Backbone with H ACT (and M FUT, STATE) tokens.
        action_norm, state_norm: Normalizers from the dataset statistics (state_norm None without state).
    """

    def __init__(self, config: PolicyConfig, backbone: Backbone, action_norm: Normalizer,
                 state_norm: Normalizer | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.vlm = backbone.model  # registers the backbone's parameters as a submodule
        d = backbone.hidden_size
        self.builder = PromptBuilder(backbone, config.image_size, config.num_fut_tokens,
                                     use_state=config.state_dim is not None,
                                     coc_mode=config.coc_mode if config.coc else None)
        self.action_norm = action_norm
        self.state_norm = state_norm
        self.action_head = ActionHead(d, config.action_dim, config.action_horizon)
        self.state_proj = nn.Linear(config.state_dim, d) if config.state_dim else None
        self.prophet = Prophet(config.world_dim, config.history, config.future, config.prophet_width,
                               config.prophet_layers, config.prophet_heads, config.prophet_delta) \
            if config.prophet else None
        self.injection = GatedCrossAttention(d, config.world_dim, config.injection_heads) if config.injection else None
        align_layer = config.align_layer or max(1, backbone.num_layers // 2)
        self.align = FutureAlignment(d, config.world_dim, align_layer) if config.flare_align else None
        if config.world_dim:  # statistics of the world latents, for the `random` corruption
            self.register_buffer("latent_mean", torch.zeros(config.world_dim))
            self.register_buffer("latent_std", torch.ones(config.world_dim))

    # ----- construction -----------------------------------------------------------------------------------------

    @classmethod
    def build(cls, config: PolicyConfig, stats: dict[str, dict], action_key: str, state_key: str | None,
              device: str | torch.device = "cpu") -> FPlusPolicy:
        """A fresh policy: loads the backbone, sets fine-tuning, and normalisation from dataset `stats`."""
        backbone = load_backbone(config.backbone, action_horizon=config.action_horizon,
                                 num_fut_tokens=config.num_fut_tokens, use_state=config.state_dim is not None)
        apply_finetune(backbone, config.finetune, config.lora_rank, config.lora_layers,
                       config.gradient_checkpointing)
        action_norm = Normalizer.from_stats(stats[action_key], config.normalization, action_key)
        state_norm = Normalizer.from_stats(stats[state_key], config.normalization, state_key) \
            if config.state_dim else None
        return cls(config, backbone, action_norm, state_norm).to(device)

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-dimension mean and std (D,) of the world latents, used by the `random` corruption."""
        if self.config.world_dim is None:
            raise FplusError("this policy uses no world latents")
        self.latent_mean.copy_(mean)
        self.latent_std.copy_(std)

    # ----- forward ----------------------------------------------------------------------------------------------

    def prompt(self, batch: dict[str, Any], with_coc: bool) -> PromptBatch:
        """The backbone inputs of a batch (built here unless the data pipeline already did: key `prompt`)."""
        if "prompt" in batch:
            return batch["prompt"]
        coc = batch.get(K.COC_TEXT) if with_coc and self.config.coc else None
        if with_coc and self.config.coc and coc is None:
            raise FplusError("this experiment trains a CoC loss but the batch has no coc_text (set COC_JSONL)")
        device = self.action_head.step.device
        return self.builder(batch[K.IMAGES], batch[K.INSTRUCTIONS], coc).to(device)

    def _act_states(self, batch: dict[str, Any], prompt: PromptBatch):
        state_embeds = None
        if self.state_proj is not None:
            state = batch[K.STATE].to(self.action_head.step.device, torch.float32)
            state_embeds = self.state_proj(self.state_norm(state))
        layers = (self.align.layer,) if self.align is not None else ()
        want_text = self.config.coc and self.config.coc_mode == "joint_after_act" and prompt.labels is not None
        out = self.backbone.forward(prompt, layers=layers, state_embeds=state_embeds, text_loss=want_text)
        act_h = prompt.gather(out.last_hidden, prompt.act_positions)
        return act_h, out, state_embeds

    def _memory(self, batch: dict[str, Any], z_pred: torch.Tensor, corruption: str | None, p_oracle: float,
                generator: torch.Generator | None) -> torch.Tensor:
        z_future = batch.get(K.Z_FUTURE)
        if corruption is not None:
            return corrupt_memory(corruption, z_pred, z_future, self.latent_mean, self.latent_std, generator)
        if p_oracle <= 0 or z_future is None:
            return z_pred
        use_oracle = torch.rand(z_pred.shape[0], generator=generator) < p_oracle  # (B,) per sample
        return torch.where(use_oracle.to(z_pred.device)[:, None, None], z_future.to(z_pred.dtype), z_pred)

    def forward(self, batch: dict[str, Any], p_oracle: float = 0.0, corruption: str | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Training/validation loss of a batch (keys in fplus.batch) -> (loss, metrics).

        Args:
            p_oracle: probability that a sample's injected memory is the true future (scheduled sampling).
            corruption: replace the memory by a corruption mode instead (validation under corruption).
        Metrics: loss, l_action and, where they apply, l_world, cos_world, l_text, l_align, cos_align, gate.
        """
        device = self.action_head.step.device
        prompt = self.prompt(batch, with_coc=True)
        act_h, out, state_embeds = self._act_states(batch, prompt)
        metrics: dict[str, float] = {}
        loss = torch.zeros((), device=device)
        if self.prophet is not None:
            z_hist = batch[K.Z_HIST].to(device, torch.float32)
            z_future = batch[K.Z_FUTURE].to(device, torch.float32)
            valid = batch[K.FUTURE_VALID].to(device)
            z_pred = self.prophet(z_hist)
            l_world, cos = world_loss(z_pred, z_future, valid)
            loss = loss + self.config.lambda_world * l_world
            metrics.update(l_world=l_world.item(), cos_world=cos.item())
            if self.injection is not None:
                memory = self._memory({**batch, K.Z_FUTURE: z_future}, z_pred, corruption, p_oracle, generator)
                act_h = self.injection(act_h, memory)
                metrics["gate"] = self.injection.gate_value
        target = self.action_norm(batch[K.ACTIONS].to(device, torch.float32))
        l_action = self.action_head.loss(act_h, target, batch[K.ACTION_PAD].to(device))
        loss = loss + l_action
        metrics["l_action"] = l_action.item()
        if self.config.coc:
            if self.config.coc_mode == "joint_after_act":
                l_text = out.text_loss
            else:
                l_text = self.backbone.text_loss(prompt.coc, state_embeds=None)
            loss = loss + self.config.lambda_text * l_text
            metrics["l_text"] = l_text.item()
        if self.align is not None:
            fut_h = prompt.gather(out.layers[self.align.layer], prompt.fut_positions)
            l_align, cos_align = self.align.loss(fut_h, batch[K.Z_FUTURE].to(device, torch.float32),
                                                 batch[K.FUTURE_VALID].to(device))
            loss = loss + self.config.lambda_align * l_align
            metrics.update(l_align=l_align.item(), cos_align=cos_align.item())
        metrics["loss"] = loss.item()
        return loss, metrics

    @torch.no_grad()
    def predict_action_chunk(self, obs: dict[str, Any], corruption: str = "none",
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """Raw actions (B, H, A) for observations (images, instructions, [state], [z_hist], [z_future for oracle]).

        The memory is the Prophet's prediction unless `corruption` replaces it (E0 ignores it).
        """
        prompt = self.prompt(obs, with_coc=False)
        act_h, _, _ = self._act_states(obs, prompt)
        if self.injection is not None:
            device = act_h.device
            z_pred = self.prophet(obs[K.Z_HIST].to(device, torch.float32))
            oracle = obs.get(K.Z_FUTURE)
            memory = corrupt_memory(corruption, z_pred, None if oracle is None else oracle.to(device),
                                    self.latent_mean, self.latent_std, generator)
            act_h = self.injection(act_h, memory)
        return self.action_norm.inverse(self.action_head.predict(act_h).float())

    # ----- persistence ------------------------------------------------------------------------------------------

    def _own_state(self) -> dict[str, torch.Tensor]:
        """Weights and buffers outside the backbone (heads, Prophet, injection, normalisers, latent stats)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vlm.")}

    def _backbone_trainable(self) -> dict[str, torch.Tensor]:
        """The backbone weights that can differ from a fresh `load_backbone`: trainable ones (LoRA, or all)."""
        return {k: p.detach() for k, p in self.vlm.named_parameters() if p.requires_grad}

    def save(self, directory: str | Path) -> Path:
        """Write config.json, policy.safetensors, backbone_trainable.safetensors and processor/ into `directory`."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        save_file({k: v.contiguous().cpu() for k, v in self._own_state().items()}, str(directory / HEADS_FILE))
        save_file({k: v.contiguous().cpu() for k, v in self._backbone_trainable().items()},
                  str(directory / BACKBONE_FILE))
        self.backbone.tokenizer.save_pretrained(directory / PROCESSOR_DIR)
        self.backbone.image_processor.save_pretrained(directory / PROCESSOR_DIR)
        return directory

    def load_weights(self, directory: str | Path) -> None:
        """Load the weights of a `save` directory into this policy (same config), checking that they fit."""
        from safetensors.torch import load_file

        directory = Path(directory)
        own = load_file(str(directory / HEADS_FILE))
        missing, unexpected = self.load_state_dict(own, strict=False)
        missing = [k for k in missing if not k.startswith("vlm.")]
        if missing or unexpected:
            raise FplusError(f"{directory / HEADS_FILE} does not fit the config: missing {missing}, "
                             f"unexpected {unexpected}")
        trainable = load_file(str(directory / BACKBONE_FILE))
        params = dict(self.vlm.named_parameters())
        unknown = [k for k in trainable if k not in params]
        if unknown:
            raise FplusError(f"{directory / BACKBONE_FILE} has weights the backbone lacks: {unknown[:5]}")
        with torch.no_grad():
            for k, v in trainable.items():
                params[k].copy_(v)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> FPlusPolicy:
        """Rebuild a saved policy: same backbone source and fine-tuning, then the saved weights on top."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FplusError(f"{directory} holds no saved policy ({CONFIG_FILE} missing)")
        config = PolicyConfig(**json.loads((directory / CONFIG_FILE).read_text()))
        backbone = load_backbone(config.backbone, action_horizon=config.action_horizon,
                                 num_fut_tokens=config.num_fut_tokens, use_state=config.state_dim is not None)
        apply_finetune(backbone, config.finetune, config.lora_rank, config.lora_layers,
                       config.gradient_checkpointing)
        action_norm = Normalizer(config.action_dim, config.normalization)
        state_norm = Normalizer(config.state_dim, config.normalization) if config.state_dim else None
        policy = cls(config, backbone, action_norm, state_norm)
        policy.load_weights(directory)
        return policy.to(device)
