"""The vision-language backbone (DESIGN 5): a Qwen3-VL (or Qwen2.5-VL) model, its tokenizer and image processor.

    load_backbone(name, action_horizon=H, num_fut_tokens=M, use_state=..., revision=None) -> Backbone
    name: an alias (qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b, qwen2.5-vl-3b), a hub id, a local directory written by
          `save_backbone`, `tiny` or `random-qwen3-vl-2b` / `-4b` (random weights, built by fplus.model.tiny).
    revision: a hub id's branch, tag or commit (None: main); `Backbone.revision` is the commit actually loaded.

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

from fplus.errors import CheckpointError, ConfigError
from fplus.model.chat import CHAT_TEMPLATE, PAD, STATE_TOKEN, act_token, fut_token
from fplus.model.host_inputs import placeholder_check_on_host, qwen3vl_inputs
from fplus.model.tiny import RANDOM_SIZES, build_random, build_tiny

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
NEW_ROW_SEED = 0  # seed of the perturbation added to the new special tokens' embedding rows


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
    hidden_size: d. num_layers: decoder layers. name: as given by the user. source: the hub id, directory, `tiny`
    or `random-*`. revision: the commit hash loaded for a hub id; None for the others.
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
    revision: str | None = None

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
            if vlm.config.model_type == "qwen3_vl":  # every data-dependent input computed on the host
                inputs = qwen3vl_inputs(vlm, batch, batch.input_ids.device)
                image_tokens = batch.image_tokens
            else:  # the model derives positions and masks itself
                inputs = {"attention_mask": batch.attention_mask,
                          "image_grid_thw": batch.image_grid_thw.to(batch.input_ids.device)}
                image_tokens = None
            with placeholder_check_on_host(vlm.model, image_tokens):
                out = vlm.model(input_ids=batch.input_ids, pixel_values=batch.pixel_values,
                                mm_token_type_ids=batch.mm_token_type_ids, use_cache=False, **inputs)
        last = out.last_hidden_state
        loss = None
        if text_loss:
            if batch.labels is None:
                raise ValueError("text_loss=True needs a batch with labels (CoC text)")
            loss = lm_loss(vlm.get_output_embeddings(), last, batch.labels, batch.label_index, batch.label_targets)
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


def lm_loss(lm_head: nn.Module, last_hidden: torch.Tensor, labels: torch.Tensor, index: torch.Tensor | None = None,
            targets: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[:, t+1]; -100 is ignored. (B, L, d), (B, L) -> scalar.

    Only the labelled positions go through the LM head (a full (B, L, vocab) logit tensor would be large). `index`,
    `targets` (N,): those positions as flat indices into (B, L - 1) and their tokens, computed on the host by the
    prompt builder (fplus.model.host_inputs.label_positions); without them they are found on the device (a host
    sync). Without any labelled token the loss is 0 (still attached to the graph).
    """
    if index is None or targets is None:
        keep = labels[:, 1:] != -100
        index, targets = keep.reshape(-1).nonzero().squeeze(1), labels[:, 1:][keep]
    if index.numel() == 0:  # a shape: known on the host
        return last_hidden.sum() * 0.0
    rows = last_hidden[:, :-1].reshape(-1, last_hidden.shape[-1]).index_select(0, index)
    return F.cross_entropy(lm_head(rows).float(), targets)


# -- loading ---------------------------------------------------------------------------------------------------------


def resolve_name(name: str) -> str:
    """An alias, hub id, local directory, `tiny` or `random-*` -> the source to load (hub id, directory or the name).

    Raises ConfigError for a Qwen3-VL 3B (there is none) and for a name that is none of the above.
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
        raise ConfigError(f"backbone {name!r}: Qwen3-VL has no 3B model. Qwen3-VL comes in 2B, 4B and 8B "
                          "(qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b); for a 3B model use the Qwen2.5-VL alias "
                          "qwen2.5-vl-3b.")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", raw):
        return raw
    close = difflib.get_close_matches(key, [*ALIASES, TINY], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"backbone {name!r} is not an alias, a hub id (owner/name), an existing directory or "
                      f"'tiny'.{hint} Aliases: {', '.join(ALIASES)}.")


def resolve_revision(source: str, revision: str | None = None) -> str | None:
    """The commit a hub id loads at `revision` (branch, tag or commit; None = main); None for the other sources.

    `source`: anything `resolve_name` accepts. The commit is the snapshot directory of the id's config.json in the
    hub cache (`models--org--name/snapshots/<commit>/config.json`), found as `from_pretrained` finds it: from the
    cache alone under HF_HUB_OFFLINE=1, else as the Hub resolves it. ConfigError for a hub id (or revision) that
    cannot be found, and for a revision given with `tiny`, `random-*` or a local directory.
    """
    source = resolve_name(source)
    if source == TINY or source in RANDOM_SIZES or Path(source).is_dir():
        if revision is not None:
            raise ConfigError(f"backbone {source!r} is not a hub id: revision={revision!r} does not apply; unset it")
        return None
    from transformers.utils import CONFIG_NAME, cached_file

    try:
        config_file = cached_file(source, CONFIG_NAME, revision=revision)
    except OSError as err:
        raise ConfigError(_unavailable(source, revision, err)) from err
    snapshot = Path(config_file or "").parent
    if snapshot.parent.name != "snapshots" or not re.fullmatch(r"[0-9a-f]{40}", snapshot.name):
        raise ConfigError(f"backbone {source!r}{_at(revision)}: no {CONFIG_NAME} in a hub cache snapshot "
                          f"({config_file}), so the commit loaded is unknown")
    return snapshot.name


def load_backbone(name: str, *, action_horizon: int, num_fut_tokens: int, use_state: bool,
                  dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  revision: str | None = None, attn_impl: str = "auto") -> Backbone:
    """Load a backbone and add its special tokens: H <ACT_i>, M <FUT_j> and, with use_state, one <STATE>.

    `name`: alias, hub id, local directory (from `save_backbone`), `tiny` or `random-*`. A hub id is read (config,
    model, tokenizer, image processor) at the commit `resolve_revision(name, revision)`, kept as `.revision`.
    ConfigError: a bad name, a hub id that cannot be loaded, an unsupported model type. CheckpointError: a local
    directory that is not a saved backbone.
    """
    if action_horizon < 1 or num_fut_tokens < 0:
        raise ConfigError(f"action_horizon must be >= 1, num_fut_tokens >= 0; got {action_horizon}, {num_fut_tokens}")
    source = resolve_name(name)
    commit = resolve_revision(source, revision)
    if source == TINY:
        model, tokenizer, image_processor = build_tiny()
    elif source in RANDOM_SIZES:
        model, tokenizer, image_processor = build_random(source, dtype)
    else:
        model, tokenizer, image_processor = _from_pretrained(source, dtype, commit)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = PAD

    act = [act_token(i) for i in range(action_horizon)]
    fut = [fut_token(j) for j in range(num_fut_tokens)]
    state = [STATE_TOKEN] if use_state else []
    add_special_tokens(model, tokenizer, act + fut + state)

    model.to(device=device, dtype=dtype)
    model.set_attn_implementation(resolve_attention(attn_impl))
    text_config = model.config.get_text_config()
    return Backbone(
        model, tokenizer, image_processor, act_token_ids=tokenizer.convert_tokens_to_ids(act),
        fut_token_ids=tokenizer.convert_tokens_to_ids(fut),
        state_token_id=tokenizer.convert_tokens_to_ids(STATE_TOKEN) if use_state else None,
        hidden_size=int(text_config.hidden_size), num_layers=int(text_config.num_hidden_layers),
        name=name, source=source, revision=commit)


def resolve_attention(attn_impl: str) -> str:
    """ATTN_IMPL -> the attention implementation: `auto` is flash_attention_2 on CUDA when the flash-attn package
    imports, else sdpa; `flash_attention_2` without CUDA or flash-attn is a ConfigError (no silent fallback)."""
    import importlib.util

    has_flash = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    if attn_impl == "auto":
        return "flash_attention_2" if has_flash else "sdpa"
    if attn_impl == "flash_attention_2" and not has_flash:
        raise ConfigError("ATTN_IMPL=flash_attention_2 needs CUDA and the flash-attn package (pip install flash-attn); "
                          "use ATTN_IMPL=sdpa or auto")
    if attn_impl not in ("sdpa", "eager", "flash_attention_2"):
        raise ConfigError(f"ATTN_IMPL={attn_impl!r}: use auto, sdpa, flash_attention_2 or eager")
    return attn_impl


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
        raise ConfigError(f"backbone model type {model_type!r} is not supported; supported: {', '.join(classes)}")
    return classes[model_type]


def _at(revision: str | None) -> str:
    return "" if revision is None else f" at revision {revision!r}"


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")


def _unavailable(source: str, revision: str | None, err: Exception) -> str:
    """One line: why hub id `source` cannot be loaded, and how to fix it."""
    from huggingface_hub import constants

    fix = "set BACKBONE to a local directory holding a saved backbone, or to 'tiny' (small random model for CPU)"
    if constants.is_offline_mode():
        get = f"hf download {source}" + ("" if revision is None else f" --revision {revision}")
        return (f"backbone {source!r}{_at(revision)} is not in the local hub cache ({constants.HF_HUB_CACHE}) and "
                f"HF_HUB_OFFLINE=1: download it once online (`{get}`), or {fix}")
    return f"cannot load backbone {source!r}{_at(revision)}: {_first_line(err)}. Without hub access {fix}"


def _from_pretrained(source: str, dtype: torch.dtype, revision: str | None) -> tuple[nn.Module, Any, Any]:
    """Config, model, tokenizer and image processor from a hub id (at commit `revision`) or a local directory."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    local = Path(source).is_dir()
    if local and not (Path(source) / "config.json").is_file():
        raise CheckpointError(f"{source} is not a saved backbone (no config.json): write it with save_backbone, "
                              "or set BACKBONE to an alias, a hub id or 'tiny'")
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
        model_cls = _model_class(config.model_type)
        model = model_cls.from_pretrained(source, dtype=dtype, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        image_processor = AutoImageProcessor.from_pretrained(source, revision=revision)
    except ValueError as err:  # a model type transformers does not know
        raise ConfigError(f"backbone {source!r}: {_first_line(err)}") from err
    except OSError as err:  # a file missing or unreadable
        if local:
            raise CheckpointError(f"{source} is not a saved backbone (a file is missing or damaged): "
                                  f"{_first_line(err)}. Write it with save_backbone") from err
        raise ConfigError(_unavailable(source, revision, err)) from err
    return model, tokenizer, image_processor
