"""Token names and the chat template shared by the backbone, the prompt builder and the tiny tokenizer (DESIGN 5).

Qwen's special tokens (the names every Qwen-VL tokenizer uses) and fplus's added query tokens: <ACT_i>, <FUT_j>
and <STATE>. Torch-free.
"""

from __future__ import annotations

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
