"""Qwen3-VL's data-dependent inputs, computed on the host so that a forward pass reads nothing back from the device.

Left to the model, Qwen3-VL (transformers 5) derives from the token ids and image grids, inside every forward:
the multimodal rotary positions (`get_rope_index`: about 5 host syncs per sample), the vision encoder's patch
positions, interpolation taps and per-image sequence bounds (one sync per vision layer with sdpa), and the decision
whether the causal mask can be skipped (1-2 syncs). All of them are functions of the prompt alone:

    mrope_positions(...)   (3, B, L) M-RoPE positions; the prompt builder computes them in the data workers
    causal_padding_mask()  (B, 1, L, L) the causal mask with padding, built in the data workers too
    label_positions()      the CoC loss's labelled positions and targets, idem
    qwen3vl_inputs(...)    the keyword arguments of `Qwen3VLModel.forward` for one PromptBatch whose tensors are on
                           `device` except `image_grid_thw` (kept on the host, fplus.model.prompt.HOST_FIELDS)
    placeholder_check_on_host(...)  transformers' check that the image-token count matches the image features
                           (`get_placeholder_mask`, which reads the count back from the device), made against the
                           count the prompt builder knows on the host

Tests check that the outputs equal transformers' own path bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


def mrope_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor,
                    image_token_id: int, merge_size: int) -> torch.Tensor:
    """(B, L) token ids, (B, L) attention mask (right padding), (N, 3) image grids in the order the images
    appear (sample-major) -> (3, B, L) long positions: text tokens p, p+1, ... on all three axes; an image of merged
    grid (t, h, w) gets t_i + p, h_i + p, w_i + p, then p += max(h, w); padding 0."""
    b, length = input_ids.shape
    positions = torch.zeros(3, b, length, dtype=torch.long)
    grids = iter(image_grid_thw.tolist())  # host tensors throughout: no device sync
    for row in range(b):
        n = int(attention_mask[row].sum())
        is_image = (input_ids[row, :n] == image_token_id).tolist()
        chunks, current, i = [], 0, 0
        while i < n:
            j = i
            while j < n and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:
                chunks.append(torch.arange(current, current + j - i).expand(3, -1))
                current += j - i
            else:
                t, h, w = next(grids)
                h, w = h // merge_size, w // merge_size
                grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
                chunks.append(torch.stack([axis.flatten() for axis in grid]) + current)
                current += max(h, w)
            i = j
        positions[:, row, :n] = torch.cat(chunks, dim=1)
    return positions


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 right-padding mask -> (B, 1, L, L) bool: query i attends key j <= i where j is not padding (the
    mask transformers builds for sdpa/eager, given ready-made so it does not test the padding on the device)."""
    length = attention_mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def label_positions(labels: torch.Tensor, ignore: int = -100) -> dict[str, torch.Tensor]:
    """(B, L) labels -> {label_index: (N,) flat indices into (B, L - 1) of the positions that predict a labelled
    token, label_targets: (N,) those tokens}: the CoC loss gathers these rows without a boolean mask on the device."""
    targets = labels[:, 1:]
    keep = targets != ignore
    return {"label_index": keep.reshape(-1).nonzero().squeeze(1), "label_targets": targets[keep]}


def qwen3vl_inputs(vlm: Any, batch: Any, device: torch.device) -> dict[str, Any]:
    """Keyword arguments of `vlm.model(...)` (a Qwen3VLForConditionalGeneration) for `batch` (a PromptBatch on
    `device` but for its host `image_grid_thw`) besides input_ids, pixel_values and mm_token_type_ids, with every
    grid-dependent tensor precomputed on the host and moved once: the attention mask (4D under sdpa/eager), the
    M-RoPE positions, and the vision encoder's grid, interpolation taps, patch positions and sequence bounds."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    grid = batch.image_grid_thw.cpu()  # already a host tensor: no sync
    visual = vlm.model.visual
    implementation = str(vlm.config._attn_implementation or "")
    flash = "flash" in implementation
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.config.spatial_merge_size)
    cu_seqlens = get_vision_cu_seqlens(grid)
    out: dict[str, Any] = {
        "attention_mask": batch.attention_mask,
        "image_grid_thw": grid,
        "image_interp_indices": indices.to(device, non_blocking=True),
        "image_interp_weights": weights.to(device, non_blocking=True),
        "image_position_ids": get_vision_position_ids(grid, visual.spatial_merge_size).to(device, non_blocking=True),
        # sdpa/eager split the packed images on the host by these bounds; flash-attention reads them on the device
        "image_cu_seqlens": cu_seqlens.to(device, non_blocking=True) if flash else cu_seqlens,
    }
    if flash:
        out["image_max_seqlen"] = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    elif batch.causal_mask is not None and implementation in ("sdpa", "eager"):
        # ready-made (transformers returns a 4D mask as it is): sdpa takes it as bool, eager adds it (0 / min)
        mask = batch.causal_mask
        if implementation == "eager":
            mask = torch.zeros(mask.shape, dtype=vlm.dtype, device=mask.device).masked_fill(~mask,
                                                                                          torch.finfo(vlm.dtype).min)
        out["attention_mask"] = mask
    if batch.position_ids is not None:
        out["position_ids"] = batch.position_ids
    return out


@contextmanager
def placeholder_check_on_host(model: Any, image_tokens: int | None) -> Iterator[None]:
    """Within the block, `model.get_placeholder_mask` (a Qwen3VLModel's) returns transformers' masks but checks the
    image-token count against the image features with `image_tokens`, the count of image placeholders in the batch's
    input ids as the prompt builder counted them on the host, instead of reading it back from the device (a host
    sync every forward). The same error on a mismatch. None, inputs given as embeddings, or video features: the
    model's own method."""
    if image_tokens is None:
        yield
        return
    original = model.get_placeholder_mask

    def masks(input_ids, inputs_embeds, image_features=None, video_features=None):
        if input_ids is None or video_features is not None:
            return original(input_ids, inputs_embeds, image_features, video_features)
        if image_features is not None and image_tokens * inputs_embeds.shape[-1] != image_features.numel():
            raise ValueError(f"Image features and image tokens do not match, tokens: {image_tokens}, features: "
                             f"{image_features.shape[0]}")
        image = (input_ids == model.config.image_token_id).unsqueeze(-1).to(inputs_embeds.device)
        video = (input_ids == model.config.video_token_id).unsqueeze(-1).to(inputs_embeds.device)
        return image, video

    model.get_placeholder_mask = masks  # an instance attribute over the class's method, removed afterwards
    try:
        yield
    finally:
        del model.get_placeholder_mask
