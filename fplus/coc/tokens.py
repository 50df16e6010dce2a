"""Token counts of CoC texts, measured with the tokenizer of the backbone that will train on them.

Only the tokenizer is loaded (never the model): `tiny` builds the test tokenizer, an alias, hub id or directory goes
through `AutoTokenizer.from_pretrained` (the local copy first, then the hub; set HF_HUB_OFFLINE=1 on a machine
without network, or huggingface_hub retries for about a minute before giving up). When that fails (offline, not
cached) the count falls back to an approximation, `ceil(1.3 x words)`, and the counter says so (`exact=False`,
`note`), so reports can flag it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

WORDS_TO_TOKENS = 1.3


@dataclass(frozen=True)
class TokenCounter:
    """Counts the tokens of a text (no special tokens added).

    name: the tokenizer's source (hub id, directory, `tiny`) or "approximate". exact: False for the word-based
    estimate. note: why the count is approximate ("" when exact).
    """

    name: str
    exact: bool
    count_fn: Callable[[str], int]
    note: str = ""

    def count(self, text: str) -> int:
        """Tokens of `text`."""
        return self.count_fn(text)


def approximate_count(text: str) -> int:
    """ceil(1.3 x whitespace-separated words): close to a Qwen BPE count for English prose."""
    return math.ceil(len(text.split()) * WORDS_TO_TOKENS)


def approximate_counter(note: str) -> TokenCounter:
    """The word-based estimate, with the reason it is used."""
    return TokenCounter(name="approximate", exact=False, count_fn=approximate_count, note=note)


def tokenizer_counter(tokenizer, name: str) -> TokenCounter:
    """A counter from a loaded (transformers) tokenizer."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return TokenCounter(name=name, exact=True, count_fn=count)


def load_token_counter(backbone: str) -> TokenCounter:
    """The counter of a BACKBONE value (alias, hub id, directory or `tiny`).

    A name that is not a backbone at all raises FplusError (from `resolve_name`); a tokenizer that cannot be
    loaded (OSError: not cached while offline, no such repository, no access; ValueError: no or broken tokenizer
    files) gives the approximate counter, whose `note` says why. Other exceptions are raised.
    """
    from fplus.model.backbone import TINY, resolve_name
    from fplus.model.tiny import build_tiny_tokenizer

    source = resolve_name(backbone)
    if source == TINY:
        return tokenizer_counter(build_tiny_tokenizer(), TINY)
    from transformers import AutoTokenizer

    try:
        try:  # the local copy (cache or directory) first: instant, and no network retries when it is there
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        except OSError:  # not in the local cache: try the hub (unless HF_HUB_OFFLINE=1)
            tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:  # offline and not cached, no such repo or no access (OSError), no or
        # broken tokenizer files (ValueError): all fall back the same way; anything else is a bug and is raised
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return approximate_counter(f"tokenizer of {source!r} not available ({first[:160]}); "
                                   f"counts are approximate ({WORDS_TO_TOKENS} x words)")
    return tokenizer_counter(tokenizer, source)
