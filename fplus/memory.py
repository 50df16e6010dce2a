"""The memory one training process needs, from the backbone's config and the settings (`fplus doctor`).

    shape = backbone_shape("qwen3-vl-2b")           # sizes from fplus.model.tiny, a local or cached config.json
    est = estimate_memory(settings)                 # MemoryEstimate: bytes per component, .total, .gpu_total

Nothing is built: the sizes come from the config (`tiny` / `random-*`: fplus.model.tiny; a local directory: its
config.json; a hub id: the config.json of the local hub cache, never downloaded; Qwen3-VL-2B/4B not cached: their
released sizes, which `random-qwen3-vl-2b` / `-4b` copy). Importing this module loads no torch (the `tiny` and
`random-*` sizes import fplus.model.tiny when asked for).

The components (bytes) of a training step, summed (an upper bound: on the first step the optimizer states do not
exist yet while the activations do):
- weights: trainable parameters in float32; frozen ones in bf16 with PRECISION=bf16 (on CUDA they are stored so,
  fplus.model.precision), else float32;
- gradients + AdamW: 4 + 8 bytes per trainable parameter (full: all of them; lora: the adapters; frozen: none; in
  every mode the added tokens' rows and the policy's heads);
- autocast copies (bf16 with FINETUNE=full only: frozen weights are bf16 already, LoRA adapters are small): the bf16
  copy of each decoder weight a linear saves for its backward (2 bytes a parameter; one layer's with activation
  checkpointing), the vision tower's, and the LM head's with a CoC loss;
- activations: per token and decoder layer 6h + 5q + 4kv + 4I saved elements (h hidden, q / kv the query and
  key-value widths, I the MLP width: RMSNorm inputs and outputs, projections' inputs, attention inputs and output,
  the gated MLP's four I-wide tensors) at 2 (bf16) or 4 bytes; with activation checkpointing each layer keeps its
  input and one layer is recomputed at a time; 4h more per token for the embeddings and the final norm. Vision:
  11v + 2Iv elements per patch and block, every block when the tower trains (full), one at a time otherwise (no
  gradient reaches it);
- CoC logits: the labelled tokens (of the ceil(COC_FRACTION x BATCH_SIZE) samples that carry CoC text) x vocabulary
  in float32, 3 copies (logits, log-softmax, their gradient).
Sequence: per camera the visual tokens at IMAGE_SIZE ((IMAGE_SIZE / (patch x merge))^2) and 2 delimiters, the chat
template with a typical instruction (PROMPT_TEXT_TOKENS), the H ACT tokens, the FUT tokens (FLARE), <STATE>, and with
a CoC loss COC_MAX_TOKENS + 2 (after the ACT tokens, or in a second pass with COC_MODE=separate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fplus.errors import FplusError
from fplus.settings import ModelSettings, Settings, coc_samples

WEIGHT_BYTES = 4  # float32 weights: the trainable ones always, the frozen ones unless PRECISION=bf16 (then 2)
TRAINABLE_BYTES = 4 + 8  # float32 gradient, AdamW exp_avg and exp_avg_sq
PROMPT_TEXT_TOKENS = 40  # chat template + a typical instruction
VISION_DELIMITERS = 2  # <|vision_start|> <|vision_end|> around each image
COC_DELIMITERS = 2
LOGIT_COPIES = 3
EMBED_ELEMS = 4  # x hidden per token outside the layers: the embeddings, the token rows' output, the final norm
WORLD_DIMS = {"dino": 768, "vjepa": 1024}  # world latent size assumed when not given (DINOv2-base, V-JEPA 2 ViT-L)
ACTION_DIM, STATE_DIM = 7, 8  # assumed when not given (LIBERO); they change the heads by a few thousand parameters
GPU_OVERHEAD = 0.10  # caching-allocator fragmentation, on top of the tensors
CUDA_CONTEXT_BYTES = 0.5 * 2**30  # CUDA context and kernels of a process
RELEASED = {"Qwen/Qwen3-VL-2B-Instruct": "random-qwen3-vl-2b", "Qwen/Qwen3-VL-4B-Instruct": "random-qwen3-vl-4b"}


class SizeUnknown(FplusError):
    """The backbone's config is not at hand (a hub id not in the local cache, an unsupported config)."""


@dataclass(frozen=True)
class BackboneShape:
    """The sizes of a Qwen3-VL (or Qwen2.5-VL) backbone that set its memory. origin: where they were read.

    q_dim / kv_dim: heads x head_dim and key-value heads x head_dim. tokenizer_size: known for `tiny` / `random-*`
    (the added tokens grow the embedding past `vocab` when it has no spare rows); None for a released model (spare
    rows). deepstack: vision blocks whose features are merged into the text model (Qwen3-VL).
    """

    origin: str
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    q_dim: int
    kv_dim: int
    head_dim: int
    tied: bool
    attention_bias: bool
    vision_hidden: int
    vision_intermediate: int
    vision_depth: int
    vision_out: int
    patch: int
    merge: int
    temporal_patch: int
    in_channels: int
    vision_positions: int
    deepstack: int
    qk_norm: bool = True  # Qwen3: RMSNorms of the queries and keys
    gated_vision_mlp: bool = False  # Qwen2.5-VL: a gated MLP and RMSNorms in the vision blocks, no position table
    tokenizer_size: int | None = None

    @classmethod
    def from_config(cls, config: dict, origin: str, tokenizer_size: int | None = None) -> BackboneShape:
        """From a config.json dict (model_type qwen3_vl or qwen2_5_vl). SizeUnknown for another model type or a
        missing key."""
        kind = config["model_type"] if "model_type" in config else None
        if kind not in ("qwen3_vl", "qwen2_5_vl"):
            raise SizeUnknown(f"{origin}: model_type {kind!r} is not qwen3_vl or qwen2_5_vl")
        text = config["text_config"] if "text_config" in config else config  # Qwen2.5-VL: text keys at the top
        try:
            v = config["vision_config"]
            heads = text["num_attention_heads"]
            head_dim = text["head_dim"] if "head_dim" in text else text["hidden_size"] // heads
            tied = config["tie_word_embeddings"] if "tie_word_embeddings" in config else \
                text["tie_word_embeddings"] if "tie_word_embeddings" in text else True  # transformers' default
            qwen3 = kind == "qwen3_vl"
            return cls(
                origin=origin, vocab=text["vocab_size"], hidden=text["hidden_size"],
                layers=text["num_hidden_layers"], intermediate=text["intermediate_size"], q_dim=heads * head_dim,
                kv_dim=text["num_key_value_heads"] * head_dim, head_dim=head_dim, tied=bool(tied),
                attention_bias=bool(text["attention_bias"]) if "attention_bias" in text else not qwen3,
                vision_hidden=v["hidden_size"], vision_intermediate=v["intermediate_size"], vision_depth=v["depth"],
                vision_out=v["out_hidden_size"], patch=v["patch_size"], merge=v["spatial_merge_size"],
                temporal_patch=v["temporal_patch_size"], in_channels=v["in_channels"] if "in_channels" in v else 3,
                vision_positions=v["num_position_embeddings"] if qwen3 else 0,
                deepstack=len(v["deepstack_visual_indexes"]) if qwen3 else 0, qk_norm=qwen3,
                gated_vision_mlp=not qwen3, tokenizer_size=tokenizer_size)
        except KeyError as err:
            raise SizeUnknown(f"{origin}: no {err.args[0]!r} in the config") from err

    # ----- parameters ----------------------------------------------------------------------------------------

    def embedding_rows(self, added_tokens: int = 0) -> int:
        """Rows of the input embedding once fplus's tokens are added (it grows only without spare rows)."""
        return max(self.vocab, (self.tokenizer_size or 0) + added_tokens)

    @property
    def layer_params(self) -> int:
        """One decoder layer: attention (with Qwen3's q/k norms), gated MLP, two RMSNorms."""
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if self.attention_bias else 0)
        qk_norms = 2 * self.head_dim if self.qk_norm else 0
        return attention + qk_norms + 3 * h * self.intermediate + 2 * h

    def text_params(self, added_tokens: int = 0) -> int:
        rows = self.embedding_rows(added_tokens)
        return rows * self.hidden * (1 if self.tied else 2) + self.layers * self.layer_params + self.hidden

    @property
    def vision_params(self) -> int:
        """Patch embedding, position table, blocks, merger (and Qwen3-VL's deepstack mergers)."""
        v, i = self.vision_hidden, self.vision_intermediate
        patch = self.in_channels * self.temporal_patch * self.patch**2 * v + (0 if self.gated_vision_mlp else v)
        if self.gated_vision_mlp:  # RMSNorms, qkv with bias, gated MLP with biases
            block = 2 * v + 3 * v * v + 3 * v + v * v + v + 3 * v * i + 2 * i + v
        else:  # LayerNorms, qkv with bias, GELU MLP with biases
            block = 4 * v + 3 * v * v + 3 * v + v * v + v + 2 * v * i + i + v
        merged = v * self.merge**2
        merger = merged * merged + merged + merged * self.vision_out + self.vision_out
        main_norm = v if self.gated_vision_mlp else 2 * v
        return (patch + self.vision_positions * v + self.vision_depth * block + main_norm + merger
                + self.deepstack * (2 * merged + merger))

    def params(self, added_tokens: int = 0) -> int:
        return self.text_params(added_tokens) + self.vision_params

    def lora_params(self, rank: int, lora_layers: int) -> int:
        """LoRA A and B of q, k, v, o, gate, up, down in the last `lora_layers` decoder layers."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        per_layer = rank * (2 * (h + q) + 2 * (h + kv) + 3 * (h + i))
        return min(lora_layers, self.layers) * per_layer

    # ----- sequence ------------------------------------------------------------------------------------------

    def visual_tokens(self, image_size: int) -> int:
        """Tokens of one square image after the merge (224 px -> 49 for Qwen3-VL)."""
        return (image_size // (self.patch * self.merge)) ** 2

    def patches(self, image_size: int) -> int:
        """Vision-tower patches of one image (before the merge)."""
        return (image_size // self.patch) ** 2

    @property
    def layer_activation_elems(self) -> int:
        """Saved elements per token of one decoder layer (see the module docstring)."""
        return 6 * self.hidden + 5 * self.q_dim + 4 * self.kv_dim + 4 * self.intermediate

    @property
    def vision_activation_elems(self) -> int:
        """Saved elements per patch of one vision block."""
        return 11 * self.vision_hidden + 2 * self.vision_intermediate


def backbone_shape(name: str) -> BackboneShape:
    """The sizes of a BACKBONE value (alias, hub id, directory, `tiny`, `random-*`); SizeUnknown when its config
    is not at hand (never downloaded)."""
    from fplus.model.backbone import TINY, resolve_name
    from fplus.model.tiny import RANDOM_SIZES

    source = resolve_name(name)
    if source == TINY or source in RANDOM_SIZES:
        return _tiny_shape(source)
    if Path(source).is_dir():
        path = Path(source) / "config.json"
        if not path.is_file():
            raise SizeUnknown(f"{source} has no config.json")
        return BackboneShape.from_config(json.loads(path.read_text()), str(path))
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    if isinstance(cached, str):
        return BackboneShape.from_config(json.loads(Path(cached).read_text()), f"{source} (hub cache)")
    if source in RELEASED:
        shape = _tiny_shape(RELEASED[source])
        return BackboneShape(**{**shape.__dict__, "origin": f"{source}'s released sizes (not in the hub cache)",
                                "tokenizer_size": None})
    raise SizeUnknown(f"the config of {source} is not in the local hub cache (download the backbone once, or "
                      "set BACKBONE to a local directory)")


def _tiny_shape(source: str) -> BackboneShape:
    """`tiny` / `random-*`: the config fplus.model.tiny builds (no weights)."""
    from fplus.model.backbone import TINY
    from fplus.model.tiny import RANDOM_SIZES, build_tiny_tokenizer, qwen3vl_config, tiny_config

    tokenizer = build_tiny_tokenizer()
    if source == TINY:
        config = tiny_config(tokenizer).to_dict()
    else:
        text, vision = RANDOM_SIZES[source]
        config = qwen3vl_config(tokenizer, text, vision).to_dict()
        config["text_config"]["vocab_size"] = text["vocab_size"]  # the released vocabulary (build_random)
    return BackboneShape.from_config(config, f"fplus.model.tiny ({source})", tokenizer_size=len(tokenizer))


def head_params(m: ModelSettings, hidden: int, world_dim: int, history: int, future: int, action_dim: int,
                state_dim: int | None) -> int:
    """Parameters of the policy's own modules (action head, state projection, Prophet, injection, alignment)."""
    d, a, hz = hidden, action_dim, m.action_horizon

    def block(w: int) -> int:  # pre-LN transformer block with a 4w MLP
        return 12 * w * w + 13 * w

    if m.action_head == "flow":
        w = m.flow_width
        n = (2 * d + d * w + w) + (a * w + w) + (m.flow_time_dim * w + w + w * w + w) + hz * w \
            + m.flow_layers * block(w) + 2 * w + w * a + a
    else:
        n = hz * d + 2 * d + d * 2 * d + 2 * d + 2 * d * a + a
    if state_dim:
        n += state_dim * d + d
    if m.prophet:
        w, ctx = m.prophet_width, m.prophet_context
        n += world_dim * w + w + (2 * d + d * w + w if ctx else 0) + future * w + (ctx + history + future) * w \
            + m.prophet_layers * block(w) + 2 * w + w * world_dim + world_dim
    if m.injection:
        n += 2 * d + 2 * world_dim + world_dim * d + d + 4 * d * d + 4 * d + 1
    if m.flare_align:
        n += 2 * d + d * 2 * d + 2 * d + 2 * d * world_dim + world_dim
    return n


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component of one training process (module docstring), and what they were computed from."""

    weights: float
    gradients: float
    optimizer: float
    autocast_copies: float
    activations: float
    logits: float
    params: int
    trainable: int
    tokens: int  # per sample, of the main pass
    shape: BackboneShape

    @property
    def total(self) -> float:
        """The tensors' bytes."""
        return self.weights + self.gradients + self.optimizer + self.autocast_copies + self.activations + self.logits

    @property
    def gpu_total(self) -> float:
        """What a GPU must hold: the tensors, the allocator's fragmentation and the CUDA context."""
        return self.total * (1 + GPU_OVERHEAD) + CUDA_CONTEXT_BYTES

    def components(self) -> str:
        gib = 2**30
        parts = [("weights", self.weights), ("grads+AdamW", self.gradients + self.optimizer),
                 ("bf16 copies", self.autocast_copies), ("activations", self.activations),
                 ("CoC logits", self.logits)]
        return ", ".join(f"{name} {value / gib:.2f}" for name, value in parts if value)


def estimate_memory(settings: Settings, world_dim: int | None = None, action_dim: int = ACTION_DIM,
                    state_dim: int | None = STATE_DIM, shape: BackboneShape | None = None) -> MemoryEstimate:
    """The memory of one training process of `settings` (one experiment). world_dim: the latent size (default
    WORLD_DIMS of WORLD_SOURCE); state_dim applies only with a STATE_KEY. SizeUnknown when the backbone's config is
    not at hand."""
    m, t, s = settings.model, settings.train, shape or backbone_shape(settings.model.backbone)
    bf16 = m.precision == "bf16"
    act_bytes = 2 if bf16 else 4
    state = state_dim if settings.data.state_key else None
    fut = settings.world.future if m.flare_align else 0
    added = m.action_horizon + fut + (1 if state else 0)
    world = world_dim or WORLD_DIMS[settings.world.source]
    heads = head_params(m, s.hidden, world, settings.world.history, settings.world.future, action_dim, state)
    backbone = s.params(added)
    adapters = s.lora_params(m.lora_rank, m.lora_layers) if m.finetune == "lora" else 0
    rows = added * s.hidden  # TokenRows: the added tokens' rows train in every mode
    params = backbone + adapters + heads + rows
    trainable = heads + rows + adapters + (backbone if m.finetune == "full" else 0)

    cameras = 1 + (settings.data.wrist_image_key is not None)
    visual = cameras * (s.visual_tokens(m.image_size) + VISION_DELIMITERS)
    prompt = visual + PROMPT_TEXT_TOKENS + added
    coc = settings.coc.max_tokens + COC_DELIMITERS if m.coc else 0
    b = t.batch_size
    coc_rows = coc_samples(b, settings.coc.fraction)
    # (rows, tokens) of each backbone pass: joint CoC on k of B samples runs them and the other B - k apart
    # (fplus.model.prompt, PromptBatch.rest); separate runs all B action prompts, then the k CoC prompts
    if not m.coc:
        passes = [(b, prompt)]
    elif settings.coc.mode == "joint_after_act":
        passes = [(coc_rows, prompt + coc)] + ([(b - coc_rows, prompt)] if coc_rows < b else [])
    else:
        passes = [(b, prompt), (coc_rows, visual + PROMPT_TEXT_TOKENS + coc)]
    checkpointed = m.gradient_checkpointing
    per_layer = s.layer_activation_elems
    decoder = sum(rows * n * (s.layers * s.hidden + per_layer if checkpointed else s.layers * per_layer)
                  for rows, n in passes)
    vision_trains = m.finetune == "full"
    patches = sum(rows for rows, _ in passes) * cameras * s.patches(m.image_size)
    vision = patches * s.vision_activation_elems * (s.vision_depth if vision_trains and not checkpointed else 1)
    embed = sum(rows * n * EMBED_ELEMS * s.hidden for rows, n in passes)
    logits = LOGIT_COPIES * coc_rows * settings.coc.max_tokens * s.embedding_rows(added) * 4 if m.coc else 0

    copies = 0
    if bf16 and m.finetune == "full":
        decoder_weights = s.layers * s.layer_params
        copies = 2 * (s.layer_params if checkpointed else decoder_weights)
        copies += 2 * s.vision_params if not checkpointed else 0
        copies += 2 * s.embedding_rows(added) * s.hidden if m.coc else 0
    return MemoryEstimate(
        weights=WEIGHT_BYTES * trainable + (2 if bf16 else WEIGHT_BYTES) * (params - trainable),
        gradients=4 * trainable, optimizer=8 * trainable, autocast_copies=copies,
        activations=act_bytes * (decoder + vision + embed), logits=logits, params=params, trainable=trainable,
        tokens=passes[0][1], shape=s)
