"""Small and full-size Qwen3-VL backbones with random weights, built locally (DESIGN 9): no download, no network.

    build_tiny(num_layers=2) -> (model, tokenizer, image processor)   the `tiny` backbone, for CPU tests
    build_random(name, dtype) -> (model, tokenizer, image processor)  `random-qwen3-vl-2b` / `-4b`, full-size
                                                                      architectures for speed and memory numbers

The tokenizer is a byte-level BPE trained on TINY_CORPUS with Qwen's special tokens and chat template; the image
processor is Qwen2VLImageProcessorPil configured like Qwen3-VL. Weights come from TINY_SEED (the global random
stream is left untouched), so two builds are identical.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fplus.model.chat import (
    CHAT_TEMPLATE,
    IM_END,
    IMAGE_PAD,
    PAD,
    QWEN_SPECIAL_TOKENS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)

TINY_SEED = 0

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
# memory measurements without downloading them: `random-qwen3-vl-2b`, `random-qwen3-vl-4b`; and `random-qwen3-vl-mid`
# (text hidden 512, 4 layers; vision 256 x 4; the released vocabulary), a CPU-sized stand-in whose cost split between
# backbone, Prophet and CoC text is closer to the real models' than the tiny backbone's.
def _qwen3vl_sizes(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int = 8, head_dim: int = 128,
                   vision: tuple[int, int, int, int] = (1024, 4096, 24, 16),
                   deepstack: tuple[int, ...] = (5, 11, 17)) -> tuple[dict, dict]:
    """(text, vision) config; vision = (hidden, intermediate, depth, heads), the same for 2B and 4B."""
    text = {"vocab_size": 151936, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "max_position_embeddings": 262144,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                "mrope_section": [head_dim * 3 // 16, head_dim * 5 // 32, head_dim * 5 // 32],
                                "mrope_interleaved": True}}
    v_hidden, v_intermediate, depth, v_heads = vision
    vision = {"depth": depth, "hidden_size": v_hidden, "intermediate_size": v_intermediate, "num_heads": v_heads,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": hidden,
              "num_position_embeddings": 2304, "deepstack_visual_indexes": list(deepstack)}
    return text, vision


RANDOM_SIZES: dict[str, tuple[dict, dict]] = {
    "random-qwen3-vl-2b": _qwen3vl_sizes(hidden=2048, intermediate=6144, layers=28, heads=16),
    "random-qwen3-vl-4b": _qwen3vl_sizes(hidden=2560, intermediate=9728, layers=36, heads=32),
    "random-qwen3-vl-mid": _qwen3vl_sizes(hidden=512, intermediate=1536, layers=4, heads=8, kv_heads=4, head_dim=64,
                                          vision=(256, 1024, 4, 4), deepstack=(1, 2)),
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
