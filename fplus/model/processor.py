"""PolicyProcessor: the policy's input pipeline (lerobot's "processor"), saved with the policy and loaded with it.

    batch {images (B, h, w, 3) | (B, C, h, w, 3) uint8, instructions [B], [coc_text [B]], [state], [z_*] ...}
        -> the same batch plus `prompt`: a PromptBatch of tensors (token ids, attention mask, pixel values, grid,
           ACT/FUT/STATE positions, CoC labels), built by fplus.model.prompt.PromptBuilder

It holds the tokenizer (with the added <ACT_i>/<FUT_j>/<STATE> tokens) and the image processor, not the model, so it
runs in the DataLoader workers during training (the collate function calls it; outputs are pinned with the batch)
and in every inference path (offline eval, the closed loop, a policy server) before `policy.forward`, which takes
tensors only. State normalisation stays in the policy (its statistics are weights of the checkpoint). It never
augments: training-time augmentation (AUGMENT, fplus.model.augment) is an argument of the training collate
(`fplus.train.data.Collate(augment=...)`), applied to the raw frames before the processor; no inference path has it.

Saved as CHECKPOINT/policy/processor/: the tokenizer and image processor (`save_pretrained`) and
`fplus_processor.json` (image size, token names, CoC mode, state); `from_pretrained` rebuilds it from there alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fplus import batch as K
from fplus.errors import CheckpointError, ConfigError
from fplus.model.chat import STATE_TOKEN, act_token, fut_token
from fplus.model.prompt import PromptBuilder, PromptTokens
from fplus.settings import coc_samples

PROCESSOR_CONFIG = "fplus_processor.json"


class PolicyProcessor:
    """Builds the `prompt` of a batch for one policy.

    Args:
        builder: the PromptBuilder (tokenizer, image processor, image size, FUT tokens, state, CoC mode).
    """

    def __init__(self, builder: PromptBuilder):
        self.builder = builder

    @classmethod
    def for_backbone(cls, backbone: Any, image_size: int, num_fut_tokens: int, use_state: bool,
                     coc_mode: str | None) -> PolicyProcessor:
        """The processor of a freshly loaded backbone (its tokenizer already holds the added tokens)."""
        return cls(PromptBuilder(backbone, image_size, num_fut_tokens, use_state=use_state, coc_mode=coc_mode))

    @property
    def tokens(self) -> PromptTokens:
        return self.builder.tokens

    def __call__(self, batch: dict[str, Any], with_coc: bool = False, coc_fraction: float = 1.0,
                 coc_prompt: bool = False) -> dict[str, Any]:
        """A copy of `batch` with K.PROMPT added. `with_coc`: append the batch's CoC texts (training of a CoC
        experiment; an error when the processor has a CoC mode but the batch has no texts) to its first
        ceil(coc_fraction x B) samples (COC_FRACTION; the training order is shuffled, so they are a random subset).
        `coc_prompt`: also K.COC_PROMPT, the prompt with every sample's CoC text (validation's L_text), from the same
        image preprocessing; only when the batch has CoC texts."""
        coc, samples = None, None
        if with_coc and self.builder.coc_mode is not None:
            coc = batch.get(K.COC_TEXT)
            if coc is None:
                raise ConfigError("this experiment trains a CoC loss but the batch has no coc_text (set COC_JSONL)")
            samples = coc_samples(len(coc), coc_fraction)
        both = coc_prompt and K.COC_TEXT in batch
        images = self.builder.preprocess(batch[K.IMAGES]) if both else batch[K.IMAGES]
        out = {**batch, K.PROMPT: self.builder(images, batch[K.INSTRUCTIONS], coc, coc_samples=samples)}
        if both:
            out[K.COC_PROMPT] = self.builder(images, batch[K.INSTRUCTIONS], batch[K.COC_TEXT])
        return out

    # ----- persistence ------------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the tokenizer, the image processor and fplus_processor.json into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        b, t = self.builder, self.tokens
        t.tokenizer.save_pretrained(directory)
        t.image_processor.save_pretrained(directory)
        config = {"image_size": b.image_size, "num_fut_tokens": b.num_fut_tokens, "use_state": b.use_state,
                  "coc_mode": b.coc_mode, "source": t.source,
                  "act_tokens": [act_token(i) for i in range(len(t.act_token_ids))],
                  "fut_tokens": [fut_token(j) for j in range(len(t.fut_token_ids))],
                  "state_token": STATE_TOKEN if t.state_token_id is not None else None}
        (directory / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PolicyProcessor:
        """The processor saved in `directory` (no hub access: everything is read from there)."""
        from transformers import AutoImageProcessor, AutoTokenizer

        from fplus.io import read_json

        directory = Path(directory)
        path = directory / PROCESSOR_CONFIG
        if not path.is_file():
            raise CheckpointError(f"{directory} holds no saved processor ({PROCESSOR_CONFIG} missing); the checkpoint "
                                  "was written by an older fplus or is incomplete: retrain or use another checkpoint")
        config = read_json(path, "the processor configuration", "the checkpoint is damaged: use another one")
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory)
            image_processor = AutoImageProcessor.from_pretrained(directory)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot load the processor saved in {directory}: {err}") from err

        def ids(names: list[str]) -> list[int]:
            found = [tokenizer.convert_tokens_to_ids(n) for n in names]
            if any(i is None or i == tokenizer.unk_token_id for i in found):
                raise CheckpointError(f"the tokenizer saved in {directory} lacks the policy's tokens {names}")
            return found

        state = config.get("state_token")
        tokens = PromptTokens(tokenizer, image_processor, ids(config["act_tokens"]), ids(config["fut_tokens"]),
                              ids([state])[0] if state else None, config["source"])
        return cls(PromptBuilder(tokens, config["image_size"], config["num_fut_tokens"],
                                 use_state=config["use_state"], coc_mode=config["coc_mode"]))

    def check_matches(self, backbone: Any, where: str | Path) -> None:
        """The saved tokenizer's special token ids must be the backbone's (else the rows would be misread)."""
        t = self.tokens
        mine = (t.act_token_ids, t.fut_token_ids[:len(backbone.fut_token_ids)], t.state_token_id)
        theirs = (list(backbone.act_token_ids), list(backbone.fut_token_ids), backbone.state_token_id)
        if mine != theirs or len(t.tokenizer) != len(backbone.tokenizer):
            raise CheckpointError(f"the processor saved in {where} does not fit the backbone {backbone.source} "
                                  f"(token ids {mine} vs {theirs}, vocabulary {len(t.tokenizer)} vs "
                                  f"{len(backbone.tokenizer)}): the backbone changed since the run was trained")
