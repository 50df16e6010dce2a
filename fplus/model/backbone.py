"""The vision-language backbone (DESIGN 5): a Qwen3-VL (or Qwen2.5-VL) model, its tokenizer and image processor.

    load_backbone(name, action_horizon=H, num_fut_tokens=M, use_state=...) -> Backbone
    name: an alias (qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b, qwen2.5-vl-3b), a hub id, a local directory written by
          `save_backbone`, or `tiny` (a small random Qwen3-VL for CPU tests, built locally from a fixed seed).

Special tokens <ACT_0>..<ACT_{H-1}>, <FUT_0>..<FUT_{M-1}> and <STATE> are added to the tokenizer (those not already
present) and the embedding matrix grows to match. Their new rows start at the mean of the existing rows plus a small
seeded perturbation, so they are in-distribution for the model and distinct from each other.

`Backbone.forward(batch)` runs the language model over a `PromptBatch` (fplus.model.prompt) and returns the last
hidden state (after the final norm, before the LM head), the hidden states after chosen decoder layers, and the
LM cross-entropy on the batch's labels. An optional `state_embeds` (B, d) replaces the <STATE> token's input
embedding; it is spliced in by a forward hook on the input-embedding module that lives for one call only.
"""

from __future__ import annotations

import difflib
import re
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fplus.errors import FplusError

if TYPE_CHECKING:
    from fplus.model.prompt import PromptBatch
    from fplus.model.token_rows import TokenRows

ALIASES: dict[str, str] = {
    "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct",
    "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
    "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
}
TINY = "tiny"
TINY_SEED = 0
NEW_ROW_SEED = 0  # seed of the perturbation added to the new special tokens' embedding rows

# Qwen's special tokens (the names every Qwen-VL tokenizer uses).
PAD = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
QWEN_SPECIAL_TOKENS = (PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
STATE_TOKEN = "<STATE>"


def act_token(i: int) -> str:
    """The i-th action query token, `<ACT_i>`."""
    return f"<ACT_{i}>"


def fut_token(j: int) -> str:
    """The j-th future query token, `<FUT_j>`."""
    return f"<FUT_{j}>"


# A Qwen-style chat template: images of a user turn render as <|vision_start|><|image_pad|><|vision_end|>, which the
# prompt builder expands to one <|image_pad|> per visual token. Used by `tiny` and by any tokenizer without a template.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Training text of the tiny tokenizer: robot instructions and chain-of-causation style sentences.
TINY_CORPUS = """
pick up the red cup and place it on the plate. put the black bowl on the wooden cabinet.
open the top drawer of the cabinet and put the bowl inside. close the microwave door.
turn on the stove and put the moka pot on it. push the green button to the left.
slide the window to the right. press the handle down until the faucet turns on.
reach the target position with the gripper. pick the blue block and stack it on the yellow block.
move the mug to the front of the table. open the gripper, lower the arm, close the gripper, lift the object.
the gripper is above the cup, so lowering it will let the fingers close around the handle.
because the drawer is closed, the arm must pull the handle before the bowl can go inside.
the object is grasped; lifting it now moves it away from the table toward the basket.
once the door is open the robot can reach the shelf behind it and place the can there.
insert the peg into the hole. hammer the nail into the board. sweep the puck into the goal.
rotate the dial clockwise. unplug the cable from the wall. hang the towel on the rack.
put both the alphabet soup and the tomato sauce in the basket. put the cream cheese in the bowl.
turn the faucet left then right. pour the water from the bottle into the glass carefully.
the left arm holds the box while the right arm opens the lid and takes out the spoon.
approach slowly, align the gripper with the handle, then pull back along the rail.
if the block slips, the robot should open the gripper, move up, and try the grasp again.
the camera sees the plate on the right side, near the edge of the counter, next to the sink.
stack three cubes: first the large one, then the medium one, and finally the small one on top.
place the book on the shelf, push it back until it touches the wall, and release it.
""".split()


@dataclass
class BackboneOutput:
    """What one language-model pass returns.

    last_hidden: (B, L, d) after the final norm, before the LM head.
    layers: {l: (B, L, d)} the output of decoder layer l, keyed as requested (1-based, l = num_layers is the last
        layer before the final norm; negative l counts from the end, -1 = num_layers). Deepstack visual features,
        added after the first decoder layers at the image positions, are not in it.
    text_loss: scalar LM cross-entropy on the batch's labels (mean over labelled tokens), or None without labels.
    """

    last_hidden: torch.Tensor
    layers: dict[int, torch.Tensor] = field(default_factory=dict)
    text_loss: torch.Tensor | None = None


@dataclass
class Backbone:
    """A loaded backbone with its special tokens.

    model: Qwen3VLForConditionalGeneration (or Qwen2_5_VLForConditionalGeneration); may later be wrapped by peft.
    act_token_ids: H ids of <ACT_0..H-1>. fut_token_ids: M ids of <FUT_0..M-1>. state_token_id: id of <STATE> or None.
    hidden_size: d. num_layers: decoder layers. name: as given by the user. source: the hub id, directory or `tiny`.
    """

    model: nn.Module
    tokenizer: Any
    image_processor: Any
    act_token_ids: list[int]
    fut_token_ids: list[int]
    state_token_id: int | None
    hidden_size: int
    num_layers: int
    name: str
    source: str

    @property
    def vision_factor(self) -> int:
        """Image side in pixels per visual token after merge: patch_size * merge_size (32 for Qwen3-VL, 28 for 2.5)."""
        return int(self.image_processor.patch_size) * int(self.image_processor.merge_size)

    def visual_tokens(self, image_size: int) -> int:
        """Visual tokens of one `image_size` px square image after the merge, e.g. 224 -> 49 for Qwen3-VL."""
        return (image_size // self.vision_factor) ** 2

    def forward(
        self,
        batch: PromptBatch,
        layers: Sequence[int] = (),
        state_embeds: torch.Tensor | None = None,
        text_loss: bool = False,
        token_rows: TokenRows | None = None,
    ) -> BackboneOutput:
        """One pass of the language model over `batch`.

        Args:
            layers: decoder layers (1..num_layers, negative counts from the end) whose outputs to return.
            state_embeds: (B, d) added to the input embedding at the <STATE> position of each sample (needs
                batch.state_positions); gradient flows into them.
            text_loss: also compute the LM loss on batch.labels (only the labelled positions go through the LM head).
            token_rows: trainable rows that replace the embedding-matrix rows of fplus's added tokens.
        """
        vlm = self._vlm()
        wanted = self._layer_numbers(layers)
        captured: dict[int, torch.Tensor] = {}
        with self._capture_layers(vlm, wanted, captured), \
                self._edit_embeddings(vlm, batch, state_embeds, token_rows):
            out = vlm.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                pixel_values=batch.pixel_values,
                image_grid_thw=batch.image_grid_thw,
                mm_token_type_ids=batch.mm_token_type_ids,
                use_cache=False,
            )
        last = out.last_hidden_state
        loss = None
        if text_loss:
            if batch.labels is None:
                raise ValueError("text_loss=True needs a batch with labels (CoC text)")
            loss = lm_loss(vlm.get_output_embeddings(), last, batch.labels)
        chosen = {layer: captured[number] for layer, number in zip(layers, wanted, strict=True)}
        return BackboneOutput(last_hidden=last, layers=chosen, text_loss=loss)

    def hidden_states(
        self, batch: PromptBatch, layers: Sequence[int] = (), state_embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """(last_hidden (B, L, d), {layer: (B, L, d)}): see `forward`."""
        out = self.forward(batch, layers, state_embeds)
        return out.last_hidden, out.layers

    def text_loss(self, batch: PromptBatch, state_embeds: torch.Tensor | None = None,
                  token_rows: TokenRows | None = None) -> torch.Tensor:
        """Scalar LM cross-entropy on batch.labels (e.g. the CoC text of a `separate` CoC batch)."""
        loss = self.forward(batch, state_embeds=state_embeds, text_loss=True, token_rows=token_rows).text_loss
        assert loss is not None
        return loss

    # -- internals -----------------------------------------------------------------------------------------------

    def _vlm(self) -> nn.Module:
        """The *ForConditionalGeneration module, unwrapped from peft if the model was wrapped."""
        model = self.model
        get_base = getattr(model, "get_base_model", None)
        return get_base() if callable(get_base) else model

    def _layer_numbers(self, layers: Sequence[int]) -> list[int]:
        numbers = []
        for layer in layers:
            number = layer + self.num_layers + 1 if layer < 0 else layer
            if not 1 <= number <= self.num_layers:
                raise ValueError(f"layer {layer} out of range: the backbone has decoder layers 1..{self.num_layers}")
            numbers.append(number)
        return numbers

    @staticmethod
    @contextmanager
    def _capture_layers(vlm: nn.Module, numbers: list[int], into: dict[int, torch.Tensor]) -> Iterator[None]:
        decoder_layers = vlm.model.language_model.layers
        handles = []
        for number in set(numbers):
            def hook(module: nn.Module, args: Any, output: Any, number: int = number) -> None:
                into[number] = output[0] if isinstance(output, tuple) else output

            handles.append(decoder_layers[number - 1].register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @staticmethod
    @contextmanager
    def _edit_embeddings(vlm: nn.Module, batch: PromptBatch, state_embeds: torch.Tensor | None,
                         token_rows: TokenRows | None) -> Iterator[None]:
        """For one call: the added tokens' input embeddings come from `token_rows`, and `state_embeds` (B, d) is
        added at batch.state_positions."""
        if state_embeds is None and token_rows is None:
            yield
            return
        b = batch.input_ids.shape[0]
        if state_embeds is not None:
            if batch.state_positions is None:
                raise ValueError("state_embeds given but the prompt has no <STATE> token "
                                 "(build it with use_state=True)")
            if state_embeds.shape[0] != b or state_embeds.dim() != 2:
                raise ValueError(f"state_embeds must be (B={b}, d), got {tuple(state_embeds.shape)}")
        rows = torch.arange(b, device=batch.input_ids.device)
        calls = []

        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            if token_rows is not None:
                output = token_rows.apply(batch.input_ids, output)
            if state_embeds is not None:
                output = output.clone()
                output[rows, batch.state_positions] += state_embeds.to(output.dtype)
            return output

        handle = vlm.get_input_embeddings().register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
        if len(calls) != 1:
            raise RuntimeError(f"the input embedding ran {len(calls)} times in one forward; expected exactly once")


def lm_loss(lm_head: nn.Module, last_hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[:, t+1]; -100 is ignored. (B, L, d), (B, L) -> scalar.

    Only the labelled positions go through the LM head (a full (B, L, vocab) logit tensor would be large).
    Without any labelled token the loss is 0 (still attached to the graph).
    """
    targets = labels[:, 1:]
    keep = targets != -100
    if not keep.any():
        return last_hidden.sum() * 0.0
    logits = lm_head(last_hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep])


# -- loading ---------------------------------------------------------------------------------------------------------


def resolve_name(name: str) -> str:
    """An alias, hub id, local directory or `tiny` -> the source to load (hub id, directory path or `tiny`).

    Raises FplusError for a Qwen3-VL 3B (there is none) and for a name that is none of the above.
    """
    raw = name.strip()
    key = raw.lower().replace("_", "-")
    if key == TINY:
        return TINY
    if key in RANDOM_SIZES:
        return key
    if key in ALIASES:
        return ALIASES[key]
    if Path(raw).expanduser().is_dir():
        return str(Path(raw).expanduser())
    if re.search(r"qwen3\W*vl\W*3b", key):
        raise FplusError(
            f"backbone {name!r}: Qwen3-VL has no 3B model. Qwen3-VL comes in 2B, 4B and 8B "
            "(qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b); for a 3B model use the Qwen2.5-VL alias qwen2.5-vl-3b."
        )
    if re.fullmatch(r"[\w.-]+/[\w.-]+", raw):
        return raw
    close = difflib.get_close_matches(key, [*ALIASES, TINY], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise FplusError(
        f"backbone {name!r} is not an alias, a hub id (owner/name), an existing directory or 'tiny'.{hint} "
        f"Aliases: {', '.join(ALIASES)}."
    )


def load_backbone(
    name: str,
    *,
    action_horizon: int,
    num_fut_tokens: int,
    use_state: bool,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Backbone:
    """Load a backbone and add its special tokens: H <ACT_i>, M <FUT_j> and, with use_state, one <STATE>.

    `name`: alias, hub id, local directory (from `save_backbone`) or `tiny`. Hub ids go through `from_pretrained`;
    when that fails (offline, unknown id) the error says to use a local directory or `tiny`.
    """
    if action_horizon < 1 or num_fut_tokens < 0:
        raise FplusError(f"action_horizon must be >= 1 and num_fut_tokens >= 0, got {action_horizon}, {num_fut_tokens}")
    source = resolve_name(name)
    if source == TINY:
        model, tokenizer, image_processor = build_tiny()
    elif source in RANDOM_SIZES:
        model, tokenizer, image_processor = build_random(source, dtype)
    else:
        model, tokenizer, image_processor = _from_pretrained(source, dtype)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD

    act = [act_token(i) for i in range(action_horizon)]
    fut = [fut_token(j) for j in range(num_fut_tokens)]
    state = [STATE_TOKEN] if use_state else []
    add_special_tokens(model, tokenizer, act + fut + state)

    model.to(device=device, dtype=dtype)
    text_config = model.config.get_text_config()
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        image_processor=image_processor,
        act_token_ids=tokenizer.convert_tokens_to_ids(act),
        fut_token_ids=tokenizer.convert_tokens_to_ids(fut),
        state_token_id=tokenizer.convert_tokens_to_ids(STATE_TOKEN) if use_state else None,
        hidden_size=int(text_config.hidden_size),
        num_layers=int(text_config.num_hidden_layers),
        name=name,
        source=source,
    )


def save_backbone(backbone: Backbone, directory: str | Path) -> Path:
    """Write model, tokenizer and image processor with `save_pretrained`; `load_backbone(directory, ...)` reads them.

    A peft-wrapped model must be merged first (`merge_and_unload`): this saves full weights only.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backbone.model.save_pretrained(directory)
    backbone.tokenizer.save_pretrained(directory)
    backbone.image_processor.save_pretrained(directory)
    return directory


def add_special_tokens(model: nn.Module, tokenizer: Any, tokens: list[str]) -> list[str]:
    """Add the tokens not already in the tokenizer (as special tokens) and grow the embeddings to hold them.

    Returns the tokens added. The embedding matrix only grows (Qwen checkpoints carry spare rows beyond the
    tokenizer, so new ids often fit without resizing). New rows: mean of the existing token rows plus a
    perturbation of 0.1 x their per-dimension std seeded by the token's name, in the input embedding and (if
    untied) in the LM head. A token's row is therefore the same whichever other tokens are added with it (E0 and
    E4 get identical <ACT_i> and <STATE> rows), and the global random stream is left untouched.
    """
    vocab = tokenizer.get_vocab()
    new = [t for t in tokens if t not in vocab]
    if not new:
        return []
    old_len = len(tokenizer)
    tokenizer.add_tokens(new, special_tokens=True)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        with torch.random.fork_rng(devices=[]):  # resizing draws random rows (overwritten below)
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new_ids = tokenizer.convert_tokens_to_ids(new)
    inputs = model.get_input_embeddings().weight
    _init_rows(inputs, new_ids, new, old_len)
    outputs = model.get_output_embeddings()
    if outputs is not None and outputs.weight is not inputs:
        _init_rows(outputs.weight, new_ids, new, old_len)
    return new


def token_seed(token: str) -> int:
    """The seed of a new token's embedding perturbation: NEW_ROW_SEED and the token's name (stable across runs)."""
    return (NEW_ROW_SEED * 1_000_003 + zlib.crc32(token.encode())) % 2**63


@torch.no_grad()
def _init_rows(weight: torch.Tensor, ids: list[int], tokens: list[str], ref_rows: int, chunk: int = 8192) -> None:
    """weight[id] = mean(weight[:ref_rows]) + 0.1 * std(weight[:ref_rows]) * noise(token), per dimension."""
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, ref_rows, chunk):
        rows = weight[start : min(start + chunk, ref_rows)].double()
        total += rows.sum(0)
        total_sq += (rows * rows).sum(0)
    mean = total / ref_rows
    std = (total_sq / ref_rows - mean * mean).clamp(min=0).sqrt()
    for token_id, token in zip(ids, tokens, strict=True):
        generator = torch.Generator().manual_seed(token_seed(token))
        noise = torch.randn(weight.shape[1], generator=generator, dtype=torch.float64).to(weight.device)
        weight[token_id] = (mean + 0.1 * std * noise).to(weight.dtype)


def _model_class(model_type: str) -> type:
    import transformers

    classes = {
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    }
    if model_type not in classes:
        raise FplusError(f"backbone model type {model_type!r} is not supported; supported: {', '.join(classes)}")
    return classes[model_type]


def _from_pretrained(source: str, dtype: torch.dtype) -> tuple[nn.Module, Any, Any]:
    """Config, model, tokenizer and image processor from a hub id or a local directory."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(source)
        model_cls = _model_class(config.model_type)
        model = model_cls.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = AutoImageProcessor.from_pretrained(source)
    except OSError as err:
        first_line = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise FplusError(
            f"cannot load backbone {source!r}: {first_line}. Without hub access (HF_HUB_OFFLINE=1 or no network) "
            "set BACKBONE to a local directory holding a saved backbone, or to 'tiny' (small random model for CPU)."
        ) from err
    return model, tokenizer, image_processor


# -- tiny ------------------------------------------------------------------------------------------------------------


def build_tiny_tokenizer(vocab_size: int = 400) -> Any:
    """A byte-level BPE trained on TINY_CORPUS, wrapped as a transformers fast tokenizer with Qwen's special tokens.

    Ids 0..6 are QWEN_SPECIAL_TOKENS in order; <|endoftext|> pads and <|im_end|> ends a turn. Deterministic.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(TINY_CORPUS)], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        pad_token=PAD,
        eos_token=IM_END,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def build_tiny_image_processor() -> Any:
    """Qwen2VLImageProcessorPil (no torchvision) configured like Qwen3-VL: patch 16, merge 2, temporal patch 2."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 224 * 224, "longest_edge": 224 * 224},
    )


# Sizes of full Qwen3-VL architectures (from their released configs), built with random weights for speed and
# memory measurements without downloading them: `random-qwen3-vl-2b`, `random-qwen3-vl-4b`.
RANDOM_SIZES: dict[str, tuple[dict, dict]] = {
    "random-qwen3-vl-2b": (
        {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
         "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True}},
        {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "patch_size": 16,
         "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2048,
         "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]},
    ),
    "random-qwen3-vl-4b": (
        {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 262144,
         "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True}},
        {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16, "patch_size": 16,
         "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2560,
         "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]},
    ),
}


def qwen3vl_config(tokenizer: Any, text: dict, vision: dict) -> Any:
    """A Qwen3VLConfig of the given text/vision sizes whose special-token ids are the tokenizer's."""
    from transformers import Qwen3VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    text = {"vocab_size": len(tokenizer), **text, "pad_token_id": ids[PAD]}
    return Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=True,
    )


def tiny_config(tokenizer: Any, num_layers: int = 2) -> Any:
    """A small Qwen3VLConfig whose special-token ids are the tokenizer's (text d=64, 2 layers; vision d=32, depth 2).

    `num_layers` deepens the text model only (e.g. 28, the depth of Qwen3-VL-2B, to test layer-dependent settings
    such as LoRA layers and ALIGN_LAYER with a profile's own values)."""
    head_dim = 16
    return qwen3vl_config(
        tokenizer,
        text={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            # M-RoPE: rotary pairs (head_dim / 2 = 8) split over temporal, height, width.
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                "mrope_interleaved": True},
        },
        vision={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 64,  # an 8 x 8 grid, interpolated to the image's patch grid
            "deepstack_visual_indexes": [1],  # vision block 1 -> added after text layer 1 (of 2)
        },
    )


def build_random(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, Any]:
    """A full-size architecture (RANDOM_SIZES) with random weights, the tiny tokenizer and image processor."""
    from transformers import Qwen3VLForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    text, vision = RANDOM_SIZES[name]
    config = qwen3vl_config(tokenizer, text, vision)
    config.text_config.vocab_size = text["vocab_size"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Qwen3VLForConditionalGeneration(config).to(dtype)
    return model.eval(), tokenizer, build_tiny_image_processor()


def build_tiny(num_layers: int = 2) -> tuple[nn.Module, Any, Any]:
    """(model, tokenizer, image processor) of the tiny random Qwen3-VL; two builds give identical weights."""
    from transformers import Qwen3VLForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    config = tiny_config(tokenizer, num_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Qwen3VLForConditionalGeneration(config)
    return model.eval(), tokenizer, build_tiny_image_processor()
