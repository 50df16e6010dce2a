"""FPlusPolicy: the F+ vision-language-action policy, composed of one backbone and the parts of DESIGN 5.

    prompt  = image(s) + instruction + [<STATE>] <ACT_0..H-1> [<FUT_0..M-1>] [\n CoC text]
    act_h   = backbone hidden states at the ACT tokens                          (B, H, d)
    z       = (z_raw - mean) / std, per dimension, training-split statistics   (B, T|K, D)   standardised latents
    z_pred  = Prophet(z_hist, context = mean_h act_h)                           (B, K, D)     E1 E2 E4
    act_h   = act_h + tanh(gate) * CrossAttn(act_h, memory)                      memory: z_pred  E2 E4
    actions = ActionHead(act_h)                                                  (B, H, A)     ACTION_HEAD=mse
            | Euler(noise -> v(act_h, x, tau)) [RTC-guided by a prefix]          (B, H, A)     ACTION_HEAD=flow
    L = L_action + lambda_world L_world + lambda_text L_text + lambda_align L_align

World latents enter the policy raw (from the cache or the online encoder) and are standardised here, with the
statistics saved in the policy's state (`latent_norm`): every path (training, validation, offline eval, closed
loop, serving) applies the same transform because it is the policy's own. Prophet, FLARE targets and corruption
modes live in the standardised space.

During training the injected memory is the true future (oracle) with probability p_oracle per sample (scheduled
sampling, the training loop anneals it), else the prediction. At evaluation a corruption mode replaces it.
The CoC text never feeds the action path: in `joint_after_act` it follows the query tokens after a separator.

Do-no-harm: every module is initialised from its own generator, seeded by (INIT_SEED, module name), so modules
shared between experiments start from identical weights whatever else an experiment adds, and at init every
experiment's actions equal E0's bit for bit (the gate is 0, FUT tokens come after the ACT tokens).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fplus import batch as K
from fplus.errors import CheckpointError, ConfigError
from fplus.model.action_head import ActionHead, masked_mse, prefix_blend
from fplus.model.align import FutureAlignment
from fplus.model.backbone import Backbone, BackboneOutput, load_backbone
from fplus.model.config import PolicyConfig
from fplus.model.corruption import MODES, corrupt_memory, shuffle_donors
from fplus.model.finetune import apply_finetune, seeded
from fplus.model.flow_head import FlowActionHead
from fplus.model.injection import GatedCrossAttention
from fplus.model.normalize import Normalizer
from fplus.model.precision import bf16_on, in_policy_precision, store_frozen
from fplus.model.processor import PolicyProcessor
from fplus.model.prompt import PromptBatch
from fplus.model.prophet import Prophet, world_loss
from fplus.model.rtc import guided_sample, soft_mask
from fplus.model.token_rows import TokenRows

CONFIG_FILE = "config.json"
HEADS_FILE = "policy.safetensors"
BACKBONE_FILE = "backbone_trainable.safetensors"
PROCESSOR_DIR = "processor"
LOSS_WEIGHTS = {"l_action": None, "l_world": "lambda_world", "l_text": "lambda_text", "l_align": "lambda_align"}


@dataclass
class Encoded:
    """One backbone pass over a batch and the world latents it brings (standardised), before the memory.

    act_h (B, H, d); fut_h (B, M, d) the FUT states at the alignment layer, or None without FLARE alignment.
    out: the pass over `prompt` itself (its first part, `prompt.parts`; the only one that carries CoC labels, so
    its text_loss is the joint CoC loss).
    z_hist (B, T, D), z_future (B, K, D), future_valid (B, K) or None; z_pred (B, K, D) or None.
    """

    prompt: PromptBatch
    out: BackboneOutput
    act_h: torch.Tensor
    fut_h: torch.Tensor | None = None
    z_hist: torch.Tensor | None = None
    z_future: torch.Tensor | None = None
    future_valid: torch.Tensor | None = None
    z_pred: torch.Tensor | None = None


@dataclass
class Prediction:
    """actions (B, H, A) raw; memory (B, K, D) the memory that was injected, or None without an injection."""

    actions: torch.Tensor
    memory: torch.Tensor | None


@dataclass
class ChunkPrefix:
    """The previous chunk's actions that still run, for `predict(prefix=...)`: raw (B, P, A) and normalised, the
    inference delay d and the soft-mask weights W (H,) of fplus.model.rtc.soft_mask (0 from H - s on)."""

    raw: torch.Tensor
    normalised: torch.Tensor
    delay: int
    weights: torch.Tensor


class FPlusPolicy(nn.Module):
    """The policy. Build with `FPlusPolicy.build(config, stats)`; reload with `FPlusPolicy.load(dir)`, or an exported
    folder / hub id with `FPlusPolicy.from_pretrained(path_or_hub_id)`.

    Args:
        config: PolicyConfig. backbone: a loaded Backbone with H ACT (and M FUT, STATE) tokens.
        action_norm, state_norm: Normalizers from the dataset statistics (state_norm None without state).
        processor: the input pipeline (default: built from the backbone's tokenizer and image processor).

    Every method takes a batch whose `prompt` (fplus.batch.PROMPT) the processor built: `policy.processor(batch)`.
    """

    def __init__(self, config: PolicyConfig, backbone: Backbone, action_norm: Normalizer,
                 state_norm: Normalizer | None = None, processor: PolicyProcessor | None = None):
        super().__init__()
        config.check_loss_paths(backbone.num_layers)
        self.config = config
        self.backbone = backbone
        self.vlm = backbone.model  # registers the backbone's parameters as a submodule
        d = backbone.hidden_size
        self.processor = processor or PolicyProcessor.for_backbone(
            backbone, config.model.image_size, config.num_fut_tokens, use_state=config.state_dim is not None,
            coc_mode=config.coc_mode if config.model.coc else None)
        self.action_norm = action_norm
        self.state_norm = state_norm

        def make(name: str, factory: Callable[[], nn.Module]) -> nn.Module:
            with seeded(config.init_seed, name):
                return factory()

        ids = backbone.act_token_ids + backbone.fut_token_ids + (
            [backbone.state_token_id] if backbone.state_token_id is not None else [])
        rows = backbone.model.get_input_embeddings().weight.detach()[ids]
        self.token_rows = TokenRows(ids, rows)
        m = config.model
        if m.action_head == "flow":  # its own seed name: the MSE head's weights are not drawn for it
            self.action_head = make("flow_head", lambda: FlowActionHead(
                d, config.action_dim, m.action_horizon, m.flow_width, m.flow_layers, m.flow_heads, m.flow_time_dim,
                m.flow_tau))
        else:
            self.action_head = make("action_head", lambda: ActionHead(d, config.action_dim, m.action_horizon))
        self.state_proj = make("state_proj", lambda: nn.Linear(config.state_dim, d)) if config.state_dim else None
        self.prophet = make("prophet", lambda: Prophet(
            config.world_dim, config.history, config.future, m.prophet_width, m.prophet_layers, m.prophet_heads,
            m.prophet_delta, context_dim=d if m.prophet_context else None)) if m.prophet else None
        self.injection = make("injection", lambda: GatedCrossAttention(d, config.world_dim, m.injection_heads)) \
            if m.injection else None
        align_layer = config.resolved_align_layer(backbone.num_layers)
        self.align = make("align", lambda: FutureAlignment(d, config.world_dim, align_layer)) \
            if config.model.flare_align else None
        # statistics of the world latents over the training split (set_latent_stats): the standardisation
        self.latent_norm = Normalizer(config.world_dim, "mean_std") if config.world_dim else None

    # ----- construction -----------------------------------------------------------------------------------------

    @classmethod
    def build(cls, config: PolicyConfig, stats: dict[str, dict], action_key: str, state_key: str | None,
              device: str | torch.device = "cpu") -> FPlusPolicy:
        """A fresh policy: loads the backbone, sets fine-tuning, and normalisation from dataset `stats`. The
        returned policy's config records the backbone's resolved revision (the commit of a hub id)."""
        backbone = load_backbone(config.model.backbone, action_horizon=config.model.action_horizon,
                                 num_fut_tokens=config.num_fut_tokens, use_state=config.state_dim is not None,
                                 revision=config.backbone_revision, attn_impl=config.model.attn_impl)
        config = config.model_copy(update={"backbone_revision": backbone.revision})
        apply_finetune(backbone, config.model.finetune, config.model.lora_rank, config.model.lora_layers,
                       config.model.gradient_checkpointing, config.init_seed)
        action_norm = Normalizer.from_stats(stats[action_key], config.model.normalization, action_key)
        state_norm = Normalizer.from_stats(stats[state_key], config.model.normalization, state_key) \
            if config.state_dim else None
        return cls(config, backbone, action_norm, state_norm).place(device)

    def place(self, device: str | torch.device) -> FPlusPolicy:
        """Move to `device` in the run's precision (fplus.model.precision): on CUDA with PRECISION=bf16 the frozen
        backbone weights are stored in bf16, the trainable ones stay float32."""
        self.to(device)
        if bf16_on(self.config.model.precision, device):
            store_frozen(self.backbone.model, torch.bfloat16)
        return self

    def set_latent_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-dimension mean and std (D,) of the raw world latents over the training split: the standardisation."""
        if self.latent_norm is None:
            raise ConfigError("this policy uses no world latents")
        self.latent_norm.set_mean_std(mean, std)

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw world latents (..., D) -> standardised (..., D), float32 on the policy's device."""
        if self.latent_norm is None:
            raise ConfigError("this policy uses no world latents")
        return self.latent_norm(z.to(self.device, torch.float32, non_blocking=z.is_pinned()))

    @property
    def device(self) -> torch.device:
        return self.action_head.step.device

    # ----- forward ----------------------------------------------------------------------------------------------

    def prompt(self, batch: dict[str, Any], with_coc: bool) -> PromptBatch:
        """The batch's backbone inputs (built by `self.processor`), on the policy's device."""
        prompt = batch.get(K.PROMPT)
        if prompt is None:
            raise ConfigError("the batch has no `prompt`: run the policy's processor on it first "
                              "(batch = policy.processor(batch)); the data pipeline does this in its workers")
        if with_coc and self.config.model.coc and prompt.labels is None and prompt.coc is None:
            raise ConfigError("this experiment trains a CoC loss but the batch's prompt has no CoC text "
                              "(build it with processor(batch, with_coc=True); set COC_JSONL)")
        return prompt.to(self.device)

    def _passes(self, batch: dict[str, Any], prompt: PromptBatch, layers: tuple[int, ...],
                text_loss: bool) -> list[BackboneOutput]:
        """The backbone's outputs over `prompt` (on the device), one pass per part (`prompt.parts`: a COC_FRACTION
        batch's rows without CoC are not padded to the CoC rows), each with its samples' state embeddings; `layers`:
        the hidden states kept; `text_loss`: the joint CoC loss of the parts with labels."""
        state_embeds = None
        if self.state_proj is not None:
            state = batch[K.STATE].to(self.device, torch.float32, non_blocking=batch[K.STATE].is_pinned())
            state_embeds = self.state_proj(self.state_norm(state))
        outs, start = [], 0
        for part in prompt.parts:
            n = len(part.input_ids)
            outs.append(self.backbone.forward(
                part, layers=layers, state_embeds=None if state_embeds is None else state_embeds[start:start + n],
                text_loss=text_loss and part.labels is not None, token_rows=self.token_rows))
            start += n
        return outs

    def encode(self, batch: dict[str, Any], with_coc: bool) -> Encoded:
        """The backbone pass, the ACT states, the standardised latents and the Prophet's prediction."""
        prompt = self.prompt(batch, with_coc)
        layers = (self.align.layer,) if self.align is not None else ()
        want_text = self.config.model.coc and self.config.coc_mode == "joint_after_act" and prompt.labels is not None
        outs = self._passes(batch, prompt, layers, want_text)
        act_h = [part.gather(out.last_hidden, part.act_positions) for part, out in zip(prompt.parts, outs, strict=True)]
        fut_h = [part.gather(out.layers[self.align.layer], part.fut_positions)
                 for part, out in zip(prompt.parts, outs, strict=True)] if self.align is not None else []
        enc = Encoded(prompt, outs[0], torch.cat(act_h) if len(act_h) > 1 else act_h[0],
                      fut_h=(torch.cat(fut_h) if len(fut_h) > 1 else fut_h[0]) if fut_h else None)
        if self.latent_norm is not None:
            if K.Z_HIST in batch:
                enc.z_hist = self.standardize(batch[K.Z_HIST])
            if batch.get(K.Z_FUTURE) is not None:
                enc.z_future = self.standardize(batch[K.Z_FUTURE])
            if K.FUTURE_VALID in batch:
                enc.future_valid = batch[K.FUTURE_VALID].to(self.device, non_blocking=batch[K.FUTURE_VALID].is_pinned())
        if self.prophet is not None:
            if enc.z_hist is None:
                raise ConfigError("this policy has a Prophet: the batch needs z_hist (world latents)")
            context = enc.act_h.float().mean(1) if self.config.model.prophet_context else None
            enc.z_pred = self.prophet(enc.z_hist, context)
        return enc

    def memory(self, enc: Encoded, mode: str, donors: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """The memory (B, K, D) injected under corruption `mode` (see fplus.model.corruption; `donors` for
        shuffle)."""
        present = None if enc.z_hist is None else enc.z_hist[:, -1]
        return corrupt_memory(mode, enc.z_pred, enc.z_future, present, donors, generator)

    @staticmethod
    def _donors(batch: dict[str, Any], mode: str | None, generator: torch.Generator | None) -> torch.Tensor | None:
        """Shuffle donors of other episodes for a batch with `episode_index` (None for other modes)."""
        if mode != "shuffle" or "episode_index" not in batch:
            return None
        found = shuffle_donors(list(batch["episode_index"]), generator)
        if found is None:
            raise ConfigError("shuffle corruption needs a batch with samples of at least two episodes")
        return found[0]

    @property
    def is_flow(self) -> bool:
        """True with the flow-matching action head (ACTION_HEAD=flow): actions are sampled from noise."""
        return self.config.model.action_head == "flow"

    def inject(self, act_h: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """ACT states (B, H, d) with the memory (B, K, D) injected (unchanged without an injection or memory)."""
        if self.injection is not None and memory is not None:
            act_h = self.injection(act_h, memory)
        return act_h

    def noise(self, batch_size: int, source: torch.Tensor | torch.Generator | None = None) -> torch.Tensor:
        """The flow head's initial noise (B, H, A), normalised space, on the policy's device: `source` itself when
        it is a tensor, else N(0, I) drawn from the generator `source` on its device (the global CPU stream when
        None)."""
        shape = (batch_size, self.config.model.action_horizon, self.config.action_dim)
        if torch.is_tensor(source):
            if tuple(source.shape) != shape:
                raise ConfigError(f"flow noise of shape {tuple(source.shape)}, expected {shape} (B, H, A)")
            return source.to(self.device, torch.float32)
        device = "cpu" if source is None else source.device
        return torch.randn(shape, generator=source, device=device).to(self.device)

    def act(self, act_h: torch.Tensor, memory: torch.Tensor | None, noise: torch.Tensor | None = None,
            prefix: ChunkPrefix | None = None) -> torch.Tensor:
        """ACT states (B, H, d) [+ memory (B, K, D)] -> normalised actions (B, H, A).

        MSE head: the head's output (`noise` and `prefix` ignored: its prefix blend is applied to raw actions in
        `predict`). Flow head: FLOW_STEPS Euler steps from `noise` (B, H, A) (drawn from the global stream when
        None), RTC-guided towards `prefix.normalised` with the weights `prefix.weights` when a prefix is given."""
        act_h = self.inject(act_h, memory)
        if not self.is_flow:
            return self.action_head.predict(act_h)
        noise = self.noise(act_h.shape[0]) if noise is None else noise
        m = self.config.model
        if prefix is None:
            return self.action_head.sample(act_h, noise, m.flow_steps)
        return guided_sample(lambda x, tau: self.action_head.velocity(act_h, x, tau), noise, prefix.normalised,
                             prefix.weights, m.flow_steps, m.rtc_max_guidance)

    def chunk_prefix(self, prefix: torch.Tensor, inference_delay: int = 0,
                     execution_horizon: int | None = None) -> ChunkPrefix:
        """Check and prepare a previous chunk's remaining raw actions (B, P, A) for `predict`: d = inference_delay
        <= P <= H; s = execution_horizon (default H - P: the whole prefix overlaps) with d <= H - s <= P."""
        h, a = self.config.model.action_horizon, self.config.action_dim
        if prefix.dim() != 3 or prefix.shape[2] != a:
            raise ConfigError(f"prefix of shape {tuple(prefix.shape)}: expected (B, P, {a}) raw actions")
        p, d = prefix.shape[1], inference_delay
        if not 0 <= d <= p <= h:
            raise ConfigError(f"prefix of {p} actions with inference_delay {d}: need 0 <= delay <= P <= H={h}")
        s = h - p if execution_horizon is None else execution_horizon
        if not 0 <= s <= h or not d <= h - s <= p:
            raise ConfigError(f"execution_horizon s={s} with H={h}, inference_delay d={d} and a prefix of {p} "
                              f"actions: need d <= H - s <= P (the prefix covers the overlap H - s)")
        raw = prefix.to(self.device, torch.float32)
        return ChunkPrefix(raw, self.action_norm(raw), d, soft_mask(h, d, s).to(self.device))

    def finish(self, raw: torch.Tensor, prefix: ChunkPrefix | None) -> torch.Tensor:
        """Raw actions (B, H, A) -> the chunk returned to callers: with a prefix, its first d actions are the
        prefix's bit for bit (they run while the chunk is computed); the MSE head also blends the overlap
        (`prefix_blend`), the flow head's overlap already follows the prefix through RTC."""
        if prefix is None:
            return raw
        if self.is_flow:
            raw = raw.clone()
            raw[:, :prefix.delay] = prefix.raw[:, :prefix.delay]
            return raw
        return prefix_blend(raw, prefix.raw, prefix.weights, prefix.delay)

    def _training_memory(self, enc: Encoded, p_oracle: float, generator: torch.Generator | None) -> torch.Tensor:
        if p_oracle <= 0 or enc.z_future is None:
            return enc.z_pred
        use_oracle = torch.rand(enc.z_pred.shape[0], generator=generator) < p_oracle  # (B,) per sample
        return torch.where(use_oracle.to(self.device)[:, None, None], enc.z_future.to(enc.z_pred.dtype), enc.z_pred)

    def losses(self, batch: dict[str, Any], p_oracle: float = 0.0, corruption: str | None = None,
               generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The active loss terms {l_action, [l_world], [l_text], [l_align]} (unweighted scalars) and the metrics
        that are not losses (cos_world, cos_align, gate: detached 0-d tensors on the policy's device)."""
        enc = self.encode(batch, with_coc=True)
        terms: dict[str, torch.Tensor] = {}
        metrics: dict[str, torch.Tensor] = {}
        act_h = enc.act_h
        # flow head: tau and noise come first from the generator, so every experiment draws the same ones
        flow_draws = self.action_head.draw(act_h.shape[0], generator, self.device) if self.is_flow else None
        if self.prophet is not None:
            terms["l_world"], cos = world_loss(enc.z_pred, enc.z_future, enc.future_valid)
            metrics["cos_world"] = cos.detach()
        memory = None
        if self.injection is not None:
            memory = self.memory(enc, corruption, self._donors(batch, corruption, generator), generator) \
                if corruption \
                else self._training_memory(enc, p_oracle, generator)
            metrics["gate"] = self.injection.gate_tensor()
        actions = batch[K.ACTIONS]
        target = self.action_norm(actions.to(self.device, torch.float32, non_blocking=actions.is_pinned()))
        pad = batch[K.ACTION_PAD].to(self.device, non_blocking=batch[K.ACTION_PAD].is_pinned())
        if self.is_flow:
            terms["l_action"] = self.action_head.loss(self.inject(act_h, memory), target, pad, *flow_draws)
        else:
            terms["l_action"] = masked_mse(self.act(act_h, memory), target, pad)
        if self.config.model.coc:
            terms["l_text"] = self._text_term(enc)
        if self.align is not None:
            terms["l_align"], cos_align = self.align.loss(enc.fut_h, enc.z_future, enc.future_valid)
            metrics["cos_align"] = cos_align.detach()
        return terms, metrics

    def _text_term(self, enc: Encoded) -> torch.Tensor:
        """L_text of an encoded batch with CoC text: the joint pass's loss, or the separate CoC pass."""
        if self.config.coc_mode == "joint_after_act":
            return enc.out.text_loss
        return self.backbone.text_loss(enc.prompt.coc, token_rows=self.token_rows)

    @in_policy_precision
    def text_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """(L_text, labelled tokens) of a batch's K.COC_PROMPT (the CoC text of every sample; Collate(coc_prompt=
        True)): the mean next-token cross-entropy over its labelled tokens (a 0-d device tensor) and their number,
        for a token-weighted mean over batches. joint_after_act: one pass over the CoC prompt; separate: its CoC
        pass only. The actions are not touched (validation predicts them from the plain K.PROMPT)."""
        if not self.config.model.coc:
            raise ConfigError("this policy trains no CoC loss")
        prompt = batch.get(K.COC_PROMPT)
        if prompt is None:
            raise ConfigError("the batch has no coc_prompt: build it with Collate(processor, coc_prompt=True) from "
                              "samples with CoC texts")
        if self.config.coc_mode == "joint_after_act":  # the backbone pass only: no ACT states, latents or Prophet
            prompt = prompt.to(self.device)
            return self._passes(batch, prompt, (), text_loss=True)[0].text_loss, int(prompt.label_targets.numel())
        coc = prompt.coc.to(self.device)
        return self.backbone.text_loss(coc, token_rows=self.token_rows), int(coc.label_targets.numel())

    def weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """L = L_action + sum of lambda_x * L_x over the active terms."""
        total = torch.zeros((), device=self.device)
        for name, value in terms.items():
            weight = LOSS_WEIGHTS[name]
            total = total + (value if weight is None else getattr(self.config.model, weight) * value)
        return total

    @in_policy_precision
    def forward(self, batch: dict[str, Any], p_oracle: float = 0.0, corruption: str | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training/validation loss of a batch (keys in fplus.batch) -> (loss, metrics).

        Args:
            p_oracle: probability that a sample's injected memory is the true future (scheduled sampling).
            corruption: replace the memory by a corruption mode instead (validation under corruption).
        Metrics: loss, l_action and, where they apply, l_world, cos_world, l_text, l_align, cos_align, gate, as
        detached 0-d tensors on the policy's device: reading them (`float(m)`) waits for the device, so the
        training loop reads them only at LOG_EVERY (fplus.train.recipe).
        """
        terms, metrics = self.losses(batch, p_oracle, corruption, generator)
        loss = self.weighted(terms)
        metrics.update({name: value.detach() for name, value in terms.items()})
        metrics["loss"] = loss.detach()
        return loss, metrics

    @torch.no_grad()
    @in_policy_precision
    def predict(self, obs: dict[str, Any], corruption: str = "none", generator: torch.Generator | None = None,
                memory: torch.Tensor | None = None, prefix: torch.Tensor | None = None, inference_delay: int = 0,
                execution_horizon: int | None = None,
                noise: torch.Tensor | torch.Generator | None = None) -> Prediction:
        """Raw actions (B, H, A) for observations (images, instructions, [state], [z_hist raw], [z_future raw for
        oracle], [episode_index for shuffle]) and the Prophet's prediction (`memory`, None without a Prophet).

        The memory is the Prophet's prediction unless `corruption` replaces it or `memory` (B, K, D), standardised,
        is given (e.g. another rollout's prediction: closed-loop shuffle). E0 ignores both.

        Flow head (`config.model.action_head == "flow"`): the chunk is sampled from noise: `noise` (B, H, A) given,
        or drawn from the generator `noise`, or else from `generator`, before any corruption draw (so for one
        generator seed every experiment and every corruption mode start from the same noise; no generator at all:
        the global stream).

        prefix: (B, P, A) RAW actions of the previous chunk that will still run, aligned with this chunk's steps
        0 .. P-1 (P >= inference_delay d); execution_horizon s defaults to H - P (fplus.model.rtc). Flow head: RTC,
        the sampling is guided towards the prefix with the soft mask W (RTC_MAX_GUIDANCE). MSE head: a prefix
        blend (not RTC): a_i <- W_i prefix_i + (1 - W_i) a_i over the overlap. With either head the first d
        returned actions ARE the prefix's, bit for bit. Without a prefix, d and s are ignored.
        """
        enc = self.encode(obs, with_coc=False)
        plan = None if prefix is None else self.chunk_prefix(prefix, inference_delay, execution_horizon)
        drawn = self.noise(enc.act_h.shape[0], generator if noise is None else noise) if self.is_flow else None
        injected = None
        if self.injection is not None:
            injected = memory.to(self.device, torch.float32) if memory is not None else \
                self.memory(enc, corruption, self._donors(obs, corruption, generator), generator)
        raw = self.action_norm.inverse(self.act(enc.act_h, injected, drawn, plan).float())
        return Prediction(self.finish(raw, plan), None if enc.z_pred is None else enc.z_pred.detach())

    def predict_action_chunk(self, obs: dict[str, Any], corruption: str = "none",
                             generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
        """Raw actions (B, H, A): `predict(...).actions` (kwargs: memory, prefix, inference_delay, ...)."""
        return self.predict(obs, corruption, generator, **kwargs).actions

    @torch.no_grad()
    @in_policy_precision
    def predict_modes(self, batch: dict[str, Any], modes: Sequence[str],
                      generators: dict[str, torch.Generator] | None = None,
                      donors: torch.Tensor | None = None,
                      noise: torch.Tensor | torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], Encoded]:
        """Raw actions (B, H, A) under each corruption mode from ONE backbone pass (only the memory differs), and
        the encoding (for the world cosines). Without an injection only `none` is computed. `donors`: see
        `memory` (default: drawn from the batch's episode_index). Flow head: one noise (B, H, A) for every mode,
        `noise` itself or drawn from the generator `noise` (the global stream when None; evaluation passes a
        seeded one so its numbers repeat)."""
        bad = [m for m in modes if m not in MODES]
        if bad:
            raise ConfigError(f"unknown corruption modes {bad}; valid: {', '.join(MODES)}")
        enc = self.encode(batch, with_coc=False)
        if self.injection is None:
            modes = [m for m in modes if m == "none"]
        generators = generators or {}
        drawn = self.noise(enc.act_h.shape[0], noise) if self.is_flow else None
        out = {}
        for mode in modes:
            if self.injection is None:
                memory = None
            else:
                given = donors if donors is not None else self._donors(batch, mode, generators.get(mode))
                memory = self.memory(enc, mode, given, generators.get(mode))
            out[mode] = self.action_norm.inverse(self.act(enc.act_h, memory, drawn).float())
        return out, enc

    # ----- persistence ------------------------------------------------------------------------------------------

    def _own_state(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Weights and buffers outside the backbone (heads, Prophet, injection, token rows, normalisers, latent
        statistics), from `state` (a full state dict of this policy, e.g. gathered under FSDP) or its own."""
        state = self.state_dict() if state is None else state
        return {k: v for k, v in state.items() if not k.startswith("vlm.")}

    def _backbone_trainable(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The backbone weights that can differ from a fresh `load_backbone`: trainable ones (LoRA, or all), from
        `state` (its `vlm.` keys) or the parameters themselves."""
        if state is None:
            return {k: p.detach() for k, p in self.vlm.named_parameters() if p.requires_grad}
        return {k: state[f"vlm.{k}"] for k, p in self.vlm.named_parameters() if p.requires_grad}

    def save(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write config.json, policy.safetensors, backbone_trainable.safetensors and processor/ into `directory`.

        Args:
            state: the full state dict to write instead of the policy's own (the unsharded weights gathered under
                FSDP2: fplus.train.distributed.model_state), with the keys of `self.state_dict()`.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.to_json(), indent=2))
        save_file({k: v.contiguous().cpu() for k, v in self._own_state(state).items()}, str(directory / HEADS_FILE))
        save_file({k: v.contiguous().cpu() for k, v in self._backbone_trainable(state).items()},
                  str(directory / BACKBONE_FILE))
        self.processor.save_pretrained(directory / PROCESSOR_DIR)
        return directory

    def read_weights(self, directory: str | Path) -> dict[str, torch.Tensor]:
        """The weights of a `save` directory as a partial state dict of this policy: its own state and the trainable
        backbone weights (`vlm.` keys), checked against this policy's keys and (global) shapes; a saved 0-d tensor
        for a 1-element entry is reshaped (FSDP2 shards no 0-d parameter).

        Raises:
            CheckpointError: a file that does not fit the config (missing, unexpected or misshaped weights).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        own = load_file(str(directory / HEADS_FILE))
        expected = self._own_state()
        missing = [k for k in expected if k not in own]
        unexpected = [k for k in own if k not in expected]
        if missing or unexpected:
            raise CheckpointError(f"{directory / HEADS_FILE} does not fit the config: missing {missing}, "
                             f"unexpected {unexpected}")
        trainable = load_file(str(directory / BACKBONE_FILE))
        params = dict(self.vlm.named_parameters())
        unknown = [k for k in trainable if k not in params]
        if unknown:
            raise CheckpointError(f"{directory / BACKBONE_FILE} has weights the backbone lacks: {unknown[:5]}")
        state = {**own, **{f"vlm.{k}": v for k, v in trainable.items()}}
        shapes = {**{k: v.shape for k, v in expected.items()}, **{f"vlm.{k}": params[k].shape for k in trainable}}
        for k, v in state.items():
            if v.dim() == 0 and tuple(shapes[k]) == (1,):
                state[k] = v.reshape(1)
        wrong = [f"{k} {tuple(v.shape)} (expected {tuple(shapes[k])})" for k, v in state.items()
                 if v.shape != shapes[k]]
        if wrong:
            raise CheckpointError(f"{directory} holds weights of other shapes than the config's: {wrong[:5]}")
        return state

    def load_weights(self, directory: str | Path) -> None:
        """Load the weights of a `save` directory into this policy (same config), checking that they fit."""
        state = self.read_weights(directory)
        with torch.no_grad():
            self.load_state_dict(state, strict=False)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> FPlusPolicy:
        """Rebuild a saved policy: the backbone at its recorded revision (a hub id works offline from the local
        cache, HF_HUB_OFFLINE=1), the same fine-tuning, the saved processor, then the saved weights on top."""
        from fplus.io import read_json

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise CheckpointError(f"{directory} holds no saved policy ({CONFIG_FILE} missing)")
        config = PolicyConfig.from_json(read_json(directory / CONFIG_FILE, "the policy configuration",
                                                  "the checkpoint is damaged: use another one"),
                                        directory / CONFIG_FILE)
        processor = PolicyProcessor.from_pretrained(directory / PROCESSOR_DIR)
        backbone = load_backbone(config.model.backbone, action_horizon=config.model.action_horizon,
                                 num_fut_tokens=config.num_fut_tokens, use_state=config.state_dim is not None,
                                 revision=config.backbone_revision, attn_impl=config.model.attn_impl)
        processor.check_matches(backbone, directory / PROCESSOR_DIR)
        apply_finetune(backbone, config.model.finetune, config.model.lora_rank, config.model.lora_layers,
                       config.model.gradient_checkpointing, config.init_seed)
        action_norm = Normalizer(config.action_dim, config.model.normalization)
        state_norm = Normalizer(config.state_dim, config.model.normalization) if config.state_dim else None
        policy = cls(config, backbone, action_norm, state_norm, processor)
        policy.load_weights(directory)
        return policy.place(device)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, revision: str | None = None,
                        device: str | torch.device = "cpu") -> FPlusPolicy:
        """Load an exported model folder (`fplus export RUN OUT`) or a hub model id holding one (fetched with
        huggingface_hub, offline from the local cache): its files are checked against fplus_export.json, then
        `load` (fplus.model.pretrained). A world policy takes raw world latents (`z_hist`) from the encoder that
        fplus_export.json names."""
        from fplus.model.pretrained import resolve_pretrained

        return cls.load(resolve_pretrained(path_or_hub_id, revision), device=device)
