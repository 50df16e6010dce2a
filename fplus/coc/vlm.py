"""VLM-written CoC labels: a Qwen3-VL / Qwen2.5-VL model sees a few frames of an episode, the task and the templated
phases, and writes the label.

    vlm = VlmLabeler.load("qwen3-vl-2b")                     # alias, hub id or local directory (needs the weights)
    text = vlm.label(frames, task, phases, templated_text, max_tokens=128)

The frames shown are the middle frame of each phase (evenly thinned to `num_frames`). The prompt goes through the
model's chat template with one image placeholder per frame, each expanded to the frame's visual tokens, as the Qwen
processor does (the processor class itself is not used: it insists on a torchvision video processor). Decoding is
greedy, so labels are deterministic for a given model. Without the weights (offline, not cached) loading fails with
a ConfigError saying how to proceed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fplus.coc.phases import Phase
from fplus.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("qwen3_vl", "qwen2_5_vl")
IMAGE_PAD = "<|image_pad|>"


def choose_frames(phases: Sequence[Phase], num_frames: int) -> list[int]:
    """Frame indices to show: the middle frame of each phase, evenly thinned to at most `num_frames`."""
    if num_frames < 1:
        raise ConfigError(f"the VLM needs at least one frame, got num_frames={num_frames}")
    middles = [p.start + (p.length - 1) // 2 for p in phases]
    if len(middles) <= num_frames:
        return middles
    picks = np.linspace(0, len(middles) - 1, num_frames).round().astype(int)
    return [middles[i] for i in picks]


def max_words(max_tokens: int) -> int:
    """A word budget that keeps an English text under `max_tokens` Qwen tokens."""
    return max(8, int(max_tokens / 1.5))


def build_prompt(task: str, phases: Sequence[Phase], templated: str, frame_steps: Sequence[int],
                 episode_length: int, max_tokens: int) -> str:
    """The text part of the user turn (the frames come before it)."""
    phase_lines = "\n".join(
        f"{i}. {p.name}, steps {p.start}-{p.stop - 1}" + (f", moving {p.direction}" if p.direction else "")
        for i, p in enumerate(phases, start=1))
    return (
        f"The images are {len(frame_steps)} frames of a robot episode, at steps "
        f"{', '.join(map(str, frame_steps))} of {episode_length}.\n"
        f"Task: \"{task}\".\n"
        f"The recorded motion has these phases:\n{phase_lines}\n"
        f"Draft: {templated}\n"
        "Write the chain of causation of this episode: one sentence per phase, in order, saying what the robot "
        "does and why it follows from the goal of the task (use \"because\" or \"so that\"). State only what the "
        f"frames and the phases support. At most {max_words(max_tokens)} words of plain text, no list."
    )


def build_messages(prompt: str, num_images: int) -> list[dict[str, Any]]:
    """The chat: one user turn with `num_images` image placeholders, then the prompt."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def expand_image_tokens(ids: list[int], image_token_id: int, tokens_per_image: Sequence[int]) -> list[int]:
    """Repeat the i-th image placeholder `tokens_per_image[i]` times; the count of placeholders must match."""
    found = ids.count(image_token_id)
    if found != len(tokens_per_image):
        raise ConfigError(f"the chat template rendered {found} image placeholders for {len(tokens_per_image)} "
                          "images")
    out: list[int] = []
    images = iter(tokens_per_image)
    for token in ids:
        out += [token] * next(images) if token == image_token_id else [token]
    return out


def clean_generation(text: str, finished: bool) -> str:
    """One paragraph; a generation cut by the token limit keeps only its complete sentences."""
    text = " ".join(text.replace("*", " ").split())
    if not finished:
        ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
        text = text[: ends[-1]] if ends else ""
    return text.strip()


def _cannot_load(source: str, err: BaseException) -> ConfigError:
    """The error of a VLM whose files cannot be found or read (OSError: not cached while offline, no such
    repository, no access; ValueError: files transformers cannot use)."""
    first = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
    return ConfigError(f"cannot load the VLM {source!r}: {first}. Without hub access (HF_HUB_OFFLINE=1 or no "
                       "network) --vlm needs a local directory holding the model; leave out --vlm for templated "
                       "labels.")


@dataclass
class VlmLabeler:
    """A loaded Qwen-VL model with its tokenizer and image processor (build it with `VlmLabeler.load`)."""

    model: Any
    tokenizer: Any
    image_processor: Any
    source: str
    device: str
    image_size: int = 224
    num_frames: int = 4

    @classmethod
    def load(cls, name: str, device: str | None = None, image_size: int = 224, num_frames: int = 4) -> VlmLabeler:
        """Load a VLM by alias, hub id or local directory on `device` (None or "auto": cuda when available);
        ConfigError when it cannot be loaded (not a Qwen-VL model, no weights here, files that do not load)."""
        import torch

        from fplus.device import resolve_device
        from fplus.model.backbone import TINY, resolve_name

        source = resolve_name(name)
        if source == TINY:
            raise ConfigError("--vlm tiny: the tiny backbone is a random model and cannot write labels; name a "
                              "Qwen-VL model (qwen3-vl-2b, qwen3-vl-4b, qwen2.5-vl-3b, a hub id or a local directory)")
        device = resolve_device(device)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise _cannot_load(source, err) from err
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"--vlm {name!r} is a {config.model_type!r} model; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        try:
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(source)
            image_processor = AutoImageProcessor.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise _cannot_load(source, err) from err
        model.to(device).eval()
        return cls(model=model, tokenizer=tokenizer, image_processor=image_processor, source=source, device=device,
                   image_size=image_size, num_frames=num_frames)

    def encode(self, images: Sequence[np.ndarray], prompt: str) -> dict[str, Any]:
        """Model inputs of one request: input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw."""
        import torch

        s = self.image_size
        pixels = self.image_processor(images=list(images), size={"shortest_edge": s * s, "longest_edge": s * s},
                                      input_data_format="channels_last", return_tensors="pt")
        merge = int(self.image_processor.merge_size)
        per_image = (pixels["image_grid_thw"].prod(-1) // merge**2).tolist()
        text = self.tokenizer.apply_chat_template(build_messages(prompt, len(images)), tokenize=False,
                                                  add_generation_prompt=True)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = expand_image_tokens(ids, self.tokenizer.convert_tokens_to_ids(IMAGE_PAD), per_image)
        input_ids = torch.tensor([ids], dtype=torch.long)
        image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "mm_token_type_ids": (input_ids == image_token_id).to(torch.int32),
            "pixel_values": pixels["pixel_values"],
            "image_grid_thw": pixels["image_grid_thw"],
        }

    def label(self, frames: np.ndarray, task: str, phases: Sequence[Phase], templated: str, max_tokens: int) -> str:
        """The VLM's CoC text for one episode ("" when it wrote nothing usable)."""
        import torch

        steps = choose_frames(phases, self.num_frames)
        prompt = build_prompt(task, phases, templated, steps, len(frames), max_tokens)
        inputs = self.encode([frames[i] for i in steps], prompt)
        dtype = next(self.model.parameters()).dtype
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        eos = [t for t in {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")}
               if t is not None]
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                                      pad_token_id=self.tokenizer.pad_token_id or eos[0])
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        finished = any(t in eos for t in new)
        return clean_generation(self.tokenizer.decode(new, skip_special_tokens=True), finished)
