"""PromptBuilder (DESIGN 5): camera images + instructions (+ CoC texts) -> a right-padded PromptBatch.

One sample's sequence (chat template of the backbone's tokenizer; Qwen3-VL shown):

    <|im_start|>user\n  [<|vision_start|> <|image_pad|> x N <|vision_end|>] per camera  instruction <|im_end|>\n
    <|im_start|>assistant\n  [<STATE>]  <ACT_0> .. <ACT_{H-1}>  <FUT_0> .. <FUT_{M-1}>  [\n CoC text <|im_end|>]  pad

N = (image_size / 32)^2 visual tokens per camera for Qwen3-VL (patch 16, merge 2): 224 px -> 49.

The FUT tokens (FLARE alignment, E4) follow the ACT tokens: under causal attention the ACT tokens never see them,
so adding them leaves E0's ACT hidden states unchanged bit for bit (do-no-harm); they read the same prefix, so
aligning them to future latents trains the shared backbone to anticipate.

CoC modes:
    joint_after_act   a separator (a newline token, unlabelled) and the CoC text (labelled) follow the query tokens
                      in the same causal sequence. The separator predicts the first CoC token, so no ACT position
                      carries a text loss (dL_text/d final ACT hidden state = 0). With right padding and causal
                      attention nothing before the queries' end can see the text, and M-RoPE positions of the
                      prefix do not depend on it, so the ACT hidden states are unchanged (tests check bit equality).
    separate          the action prompt has no CoC; `batch.coc` (or `coc_batch`) is a second prompt, image +
                      instruction + CoC text as the assistant answer, for its own forward pass.
    None              no CoC.

Images are resized (bilinear, antialiased, aspect ratio not kept) to image_size x image_size in torch, then the
backbone's image processor normalises and patchifies them; its size bounds are pinned to image_size^2 pixels so it
never resizes again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from fplus.errors import ConfigError
from fplus.model.backbone import Backbone
from fplus.model.chat import IM_END, IMAGE_PAD
from fplus.model.host_inputs import causal_padding_mask, label_positions, mrope_positions

CocMode = Literal["joint_after_act", "separate"]
COC_MODES = ("joint_after_act", "separate")
IGNORE = -100
HOST_FIELDS = ("image_grid_thw",)
"""PromptBatch fields that `to()` leaves on the host (read there by fplus.model.host_inputs, never on a device)."""
SEPARATOR = "\n"
"""Follows the query tokens in a joint CoC prompt; it (not ACT_{H-1} or FUT_{M-1}) predicts the first CoC token."""
ImageInput = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


@dataclass(frozen=True)
class Pixels:
    """A batch's images as the image processor made them (`PromptBuilder.preprocess`), so that two prompts of the
    same images (validation's plain and CoC prompts) share one preprocessing. pixel_values, image_grid_thw: as in
    PromptBatch; samples: B; cameras: C."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    samples: int
    cameras: int


@dataclass(frozen=True)
class PromptTokens:
    """What prompt building needs of a backbone, without its model (so a builder is cheap to send to data workers).

    tokenizer (with the added tokens), image_processor, act_token_ids (H), fut_token_ids (M), state_token_id (or
    None), source (for messages).
    """

    tokenizer: Any
    image_processor: Any
    act_token_ids: list[int]
    fut_token_ids: list[int]
    state_token_id: int | None
    source: str

    @classmethod
    def of(cls, backbone: Backbone | PromptTokens) -> PromptTokens:
        if isinstance(backbone, PromptTokens):
            return backbone
        return cls(backbone.tokenizer, backbone.image_processor, list(backbone.act_token_ids),
                   list(backbone.fut_token_ids), backbone.state_token_id, backbone.source)

    @property
    def vision_factor(self) -> int:
        """Image side in pixels per visual token after merge: patch_size * merge_size (32 for Qwen3-VL)."""
        return int(self.image_processor.patch_size) * int(self.image_processor.merge_size)

    def visual_tokens(self, image_size: int) -> int:
        """Visual tokens of one `image_size` px square image after the merge, e.g. 224 -> 49 for Qwen3-VL."""
        return (image_size // self.vision_factor) ** 2


@dataclass
class PromptBatch:
    """Model inputs and token positions of B right-padded prompts of length L (C cameras, N visual tokens each).

    input_ids, attention_mask: (B, L) long; pads only at the end of a row.
    pixel_values: (B * C * 4N, 3 * 2 * 16 * 16) float, image_grid_thw: (B * C, 3) long, sample-major (sample 0's
        cameras first), as the backbone's image processor makes them.
    mm_token_type_ids: (B, L) int, 1 at image tokens, 0 elsewhere (Qwen-VL needs it to build M-RoPE positions).
    act_positions: (B, H) long, or None in a CoC-only batch. fut_positions: (B, M) long or None.
    state_positions: (B,) long or None. labels: (B, L) long, -100 except the CoC text and its closing <|im_end|>,
        or None. coc: in `separate` mode with CoC texts, the CoC batch for its own pass, else None.
    rest: in `joint_after_act` mode with CoC on only the first k < B samples (COC_FRACTION), this batch holds those
        k samples and `rest` the other B - k, without CoC and padded to their own length, so that no row pays for
        a CoC row's length; the policy runs both and concatenates them in this order (`parts`). Else None.
    position_ids: (3, B, L) long, Qwen3-VL's M-RoPE positions, 0 at padding; causal_mask: (B, 1, L, L) bool, the
        causal mask with padding. label_index, label_targets: (N,) long, the labelled next-token positions as flat
        indices into (B, L - 1) and their target ids (with labels). image_tokens: the image placeholders in
        input_ids, counted on the host (checked against the image features without a device read). All are built
        here (fplus.model.host_inputs)
        so that nothing is derived on the device. image_grid_thw stays on the host in `to()` (HOST_FIELDS): the
        backbone computes the vision encoder's grid-dependent inputs from it there.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    mm_token_type_ids: torch.Tensor
    act_positions: torch.Tensor | None
    fut_positions: torch.Tensor | None = None
    state_positions: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    coc: PromptBatch | None = None
    position_ids: torch.Tensor | None = None
    causal_mask: torch.Tensor | None = None
    label_index: torch.Tensor | None = None
    label_targets: torch.Tensor | None = None
    rest: PromptBatch | None = None
    image_tokens: int | None = None

    @property
    def parts(self) -> tuple[PromptBatch, ...]:
        """The batches of one backbone pass each, in sample order: (self,) or (self, rest)."""
        return (self,) if self.rest is None else (self, self.rest)

    @property
    def num_samples(self) -> int:
        """B, the samples of all parts."""
        return sum(len(part.input_ids) for part in self.parts)

    def to(self, device: str | torch.device) -> PromptBatch:
        """A copy with every tensor (and the CoC batch) on `device`; copies from pinned memory do not block."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and f.name not in HOST_FIELDS:
                value = value.to(device, non_blocking=value.is_pinned())
            elif isinstance(value, PromptBatch):
                value = value.to(device)
            moved[f.name] = value
        return replace(self, **moved)

    def pin_memory(self) -> PromptBatch:
        """A copy with every tensor in pinned memory (DataLoader(pin_memory=True) calls this)."""
        pinned = {}
        for f in fields(self):
            value = getattr(self, f.name)
            pinned[f.name] = value.pin_memory() if isinstance(value, (torch.Tensor, PromptBatch)) else value
        return replace(self, **pinned)

    def gather(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states at per-sample positions: (B, L, d), (B, K) -> (B, K, d)."""
        index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return hidden.gather(1, index)


class PromptBuilder:
    """Builds PromptBatches for a backbone.

    Args:
        backbone: a Backbone or its PromptTokens: the tokenizer (with its chat template), image processor and special
            token ids; the action horizon H is len(act_token_ids). Only the PromptTokens are kept (no model).
        image_size: square side in pixels; a multiple of backbone.vision_factor (32 for Qwen3-VL).
        num_fut_tokens: M <FUT_j> tokens after the ACT tokens (0 for none); at most those the backbone has.
        use_state: put a <STATE> token first in the assistant turn (its embedding is replaced by a state projection).
        coc_mode: "joint_after_act", "separate" or None (see the module docstring).
    """

    def __init__(
        self,
        backbone: Backbone | PromptTokens,
        image_size: int,
        num_fut_tokens: int,
        use_state: bool,
        coc_mode: CocMode | None,
    ):
        backbone = PromptTokens.of(backbone)
        factor = backbone.vision_factor
        if image_size < factor or image_size % factor:
            lower, upper = max(factor, image_size // factor * factor), (image_size // factor + 1) * factor
            raise ConfigError(
                f"IMAGE_SIZE={image_size} must be a multiple of {factor} for {backbone.source} "
                f"(patch {backbone.image_processor.patch_size} x merge {backbone.image_processor.merge_size}); "
                f"try {lower} or {upper}"
            )
        if num_fut_tokens > len(backbone.fut_token_ids):
            raise ConfigError(
                f"{num_fut_tokens} <FUT> tokens asked but the backbone was loaded with {len(backbone.fut_token_ids)}"
            )
        if use_state and backbone.state_token_id is None:
            raise ConfigError("use_state=True but the backbone was loaded without a <STATE> token (use_state=False)")
        if coc_mode is not None and coc_mode not in COC_MODES:
            raise ConfigError(f"unknown CoC mode {coc_mode!r}; valid: {', '.join(COC_MODES)} or None")
        self.tokens = backbone
        self.tokenizer = backbone.tokenizer
        self.image_size = image_size
        self.num_fut_tokens = num_fut_tokens
        self.use_state = use_state
        self.coc_mode = coc_mode
        self.tokens_per_image = backbone.visual_tokens(image_size)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.im_end_id = self.tokenizer.convert_tokens_to_ids(IM_END)
        self.pad_id = self.tokenizer.pad_token_id
        separator = self.tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
        if len(separator) != 1:
            raise ConfigError(f"the tokenizer splits the CoC separator {SEPARATOR!r} into {len(separator)} tokens")
        self.separator_id = separator[0]
        self._prefix_cache: dict[tuple[int, str], list[int]] = {}

    @property
    def horizon(self) -> int:
        """H, the number of ACT tokens."""
        return len(self.tokens.act_token_ids)

    def preprocess(self, images: ImageInput) -> Pixels:
        """Images (as `__call__` takes them) -> their Pixels, which `__call__` also takes."""
        cameras = self._cameras(images)
        out = self._pixels(cameras)
        return Pixels(out["pixel_values"], out["image_grid_thw"], len(cameras[0]), len(cameras))

    def __call__(
        self,
        images: ImageInput | Pixels,
        instructions: Sequence[str],
        coc_texts: Sequence[str] | None = None,
        pad_to: int | None = None,
        coc_samples: int | None = None,
    ) -> PromptBatch:
        """The action prompt for B samples.

        Args:
            images: uint8 (B, H, W, 3), or C cameras as (B, C, H, W, 3) or a list of C (B, H_c, W_c, 3); or their
                `preprocess`ed Pixels.
            instructions: B non-empty task texts.
            coc_texts: B non-empty CoC texts; needs coc_mode. joint_after_act: appended after the ACT tokens and
                labelled. separate: returned as `.coc`, a CoC-only batch sharing the pixel values.
            pad_to: pad the rows to at least this length (static shapes, or two batches of equal length).
            coc_samples: only the first k samples carry their CoC text (COC_FRACTION; None: all): joint_after_act
                with k < B: the batch holds the first k samples and `.rest` the other B - k, which end after the
                query tokens; separate: `.coc` holds the first k samples.
        """
        given = images if isinstance(images, Pixels) else self.preprocess(images)
        self._check_texts("instruction", instructions, given.samples)
        if coc_texts is not None:
            if self.coc_mode is None:
                raise ConfigError("CoC texts given but the prompt builder has coc_mode=None")
            self._check_texts("CoC text", coc_texts, len(instructions))
        b, cameras = len(instructions), given.cameras
        k = b if coc_samples is None else coc_samples
        if not 1 <= k <= b:
            raise ConfigError(f"coc_samples={coc_samples} for a batch of {b}: need 1 <= coc_samples <= {b}")
        pixels = {"pixel_values": given.pixel_values, "image_grid_thw": given.image_grid_thw}
        rows = len(given.pixel_values) // b  # pixel rows per sample (sample-major)

        def samples(lo: int, hi: int) -> dict[str, torch.Tensor]:
            if (lo, hi) == (0, b):
                return pixels
            return {"pixel_values": given.pixel_values[lo * rows: hi * rows],
                    "image_grid_thw": given.image_grid_thw[lo * cameras: hi * cameras]}

        if coc_texts is not None and self.coc_mode == "joint_after_act":
            batch = self._build(samples(0, k), cameras, instructions[:k], coc_texts[:k], with_queries=True,
                                pad_to=pad_to)
            if k < b:
                batch.rest = self._build(samples(k, b), cameras, instructions[k:], None, with_queries=True,
                                         pad_to=pad_to)
            return batch
        batch = self._build(pixels, cameras, instructions, None, with_queries=True, pad_to=pad_to)
        if coc_texts is not None and self.coc_mode == "separate":
            batch.coc = self._build(samples(0, k), cameras, instructions[:k], coc_texts[:k], with_queries=False,
                                    pad_to=pad_to)
        return batch

    def coc_batch(
        self,
        images: ImageInput,
        instructions: Sequence[str],
        coc_texts: Sequence[str],
        pad_to: int | None = None,
    ) -> PromptBatch:
        """The CoC-only prompt: image(s) + instruction, then the CoC text as the assistant answer (labelled)."""
        cameras = self._cameras(images)
        self._check_texts("instruction", instructions, len(cameras[0]))
        self._check_texts("CoC text", coc_texts, len(instructions))
        pixels = self._pixels(cameras)
        return self._build(pixels, len(cameras), instructions, coc_texts, with_queries=False, pad_to=pad_to)

    def label_ids(self, text: str) -> list[int]:
        """The labelled token ids of a CoC text: its tokens and the closing <|im_end|>."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.im_end_id]

    def prompt_length(self, instruction: str, num_cameras: int = 1) -> int:
        """Tokens of one action prompt (no CoC) with this instruction, e.g. to budget sequence length."""
        queries = int(self.use_state) + self.num_fut_tokens + self.horizon
        return len(self._prefix_ids(num_cameras, instruction)) + queries

    # -- internals -----------------------------------------------------------------------------------------------

    def _build(
        self,
        pixels: dict[str, torch.Tensor],
        num_cameras: int,
        instructions: Sequence[str],
        coc_texts: Sequence[str] | None,
        with_queries: bool,
        pad_to: int | None = None,
    ) -> PromptBatch:
        """Token rows -> right-padded tensors. The prompt ids never depend on the CoC suffix (the causality
        test)."""
        bb = self.tokens
        rows, label_rows = [], []
        state_pos, fut_pos, act_pos = [], [], []
        for i, instruction in enumerate(instructions):
            ids = list(self._prefix_ids(num_cameras, instruction))
            if with_queries:
                if self.use_state:
                    state_pos.append(len(ids))
                    ids.append(bb.state_token_id)
                act_pos.append(list(range(len(ids), len(ids) + self.horizon)))
                ids += bb.act_token_ids
                fut_pos.append(list(range(len(ids), len(ids) + self.num_fut_tokens)))
                ids += bb.fut_token_ids[: self.num_fut_tokens]
            text = None if coc_texts is None else coc_texts[i]
            if text is not None and with_queries:
                ids.append(self.separator_id)  # unlabelled: the last query token predicts nothing
            labels = [IGNORE] * len(ids)
            if text is not None:
                text = self.label_ids(text)
                ids += text
                labels += text
            rows.append(ids)
            label_rows.append(labels)

        length = max(max(len(r) for r in rows), pad_to or 0)
        b = len(rows)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((b, length), dtype=torch.long)
        labels = torch.full((b, length), IGNORE, dtype=torch.long)
        for i, (ids, lab) in enumerate(zip(rows, label_rows, strict=True)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention_mask[i, : len(ids)] = 1
            labels[i, : len(lab)] = torch.tensor(lab)
        mm_token_type_ids = (input_ids == self.image_token_id).to(torch.int32)
        rope = mrope_positions(input_ids, attention_mask, pixels["image_grid_thw"], self.image_token_id,
                               int(self.tokens.image_processor.merge_size))
        mask = causal_padding_mask(attention_mask)

        def positions(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long).reshape(b, -1)

        return PromptBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"],
            mm_token_type_ids=mm_token_type_ids,
            act_positions=positions(act_pos) if with_queries else None,
            fut_positions=positions(fut_pos) if with_queries and self.num_fut_tokens else None,
            state_positions=positions(state_pos).reshape(b) if with_queries and self.use_state else None,
            labels=labels if coc_texts is not None else None,
            position_ids=rope,
            causal_mask=mask,
            image_tokens=int(mm_token_type_ids.sum()),
            **(label_positions(labels) if coc_texts is not None else {}),
        )

    def _prefix_ids(self, num_cameras: int, instruction: str) -> list[int]:
        """Token ids of the chat up to the assistant turn's start, each image placeholder expanded to N tokens."""
        key = (num_cameras, instruction)
        if key not in self._prefix_cache:
            content = [{"type": "image"}] * num_cameras + [{"type": "text", "text": instruction}]
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            found = ids.count(self.image_token_id)
            if found != num_cameras:
                raise ConfigError(
                    f"the chat template rendered {found} image placeholders for {num_cameras} camera(s); "
                    f"it must render one {IMAGE_PAD} per image"
                )
            expanded: list[int] = []
            for token in ids:
                expanded += [token] * self.tokens_per_image if token == self.image_token_id else [token]
            if len(self._prefix_cache) > 4096:
                self._prefix_cache.clear()
            self._prefix_cache[key] = expanded
        return self._prefix_cache[key]

    def _cameras(self, images: ImageInput) -> list[torch.Tensor]:
        """-> C tensors (B, H, W, 3) uint8."""
        if isinstance(images, (list, tuple)):
            cameras = [_as_tensor(c) for c in images]
        else:
            x = _as_tensor(images)
            if x.dim() == 4:
                cameras = [x]
            elif x.dim() == 5:
                cameras = list(x.unbind(1))
            else:
                raise ConfigError(f"images must be (B, H, W, 3) or (B, C, H, W, 3), got shape {tuple(x.shape)}")
        if not cameras:
            raise ConfigError("no camera images given")
        for c in cameras:
            if c.dim() != 4 or c.shape[-1] != 3 or c.dtype != torch.uint8:
                raise ConfigError(f"each camera must be uint8 (B, H, W, 3), got {c.dtype} {tuple(c.shape)}")
            if c.shape[0] != cameras[0].shape[0]:
                raise ConfigError("all cameras must have the same batch size")
        return cameras

    def _pixels(self, cameras: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """C cameras (B, H, W, 3) uint8 -> pixel_values, image_grid_thw (sample-major) from the image processor."""
        s = self.image_size
        resized = [self._resize(c.cpu()) for c in cameras]
        images = [resized[c][b].numpy() for b in range(len(resized[0])) for c in range(len(resized))]
        out = self.tokens.image_processor(
            images=images,
            size={"shortest_edge": s * s, "longest_edge": s * s},
            input_data_format="channels_last",
            return_tensors="pt",
        )
        grid = out["image_grid_thw"]
        merge = int(self.tokens.image_processor.merge_size)
        tokens = grid.prod(-1) // merge**2
        if not bool((tokens == self.tokens_per_image).all()):
            raise ConfigError(f"image processor made {tokens.tolist()} visual tokens, expected {self.tokens_per_image}")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}

    def _resize(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, s, s, 3) uint8, bilinear with antialiasing (no-op at the right size)."""
        s = self.image_size
        if frames.shape[1:3] == (s, s):
            return frames
        x = frames.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    @staticmethod
    def _check_texts(what: str, texts: Sequence[str], batch: int) -> None:
        if isinstance(texts, str):
            raise ConfigError(f"{what}s must be a list of strings, one per sample, not one string")
        if len(texts) != batch:
            raise ConfigError(f"{len(texts)} {what}s for a batch of {batch}")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"{what} {i} is empty or not a string: {text!r}")


def _as_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A torch view of a tensor, or a (writable, so torch does not warn) copy of an array."""
    return images if isinstance(images, torch.Tensor) else torch.from_numpy(np.array(images))
