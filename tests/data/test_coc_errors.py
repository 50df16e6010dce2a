"""Injected failures of loading a tokenizer (token counts) and a VLM (labels): the failures that mean "not
available here" are handled (the approximate count; a ConfigError saying how to proceed), anything else is raised.
"""

from __future__ import annotations

import pytest
import transformers

from fplus.coc.tokens import load_token_counter
from fplus.coc.vlm import VlmLabeler
from fplus.device import resolve_device
from fplus.errors import ConfigError

SOURCE = "some-owner/some-model"


class FakeTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split()) * 2))}


def loads(monkeypatch, cls, *outcomes):
    """`cls.from_pretrained` returns or raises `outcomes` in turn; returns the list of its calls' kwargs."""
    calls, pending = [], list(outcomes)

    def from_pretrained(source, **kwargs):
        calls.append(kwargs)
        outcome = pending.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(cls, "from_pretrained", from_pretrained)
    return calls


# -- token counts ------------------------------------------------------------------------------------------------


def test_a_tokenizer_not_in_the_cache_is_loaded_from_the_hub(monkeypatch):
    calls = loads(monkeypatch, transformers.AutoTokenizer, OSError("not in the cache"), FakeTokenizer())
    counter = load_token_counter(SOURCE)
    assert counter.exact and counter.name == SOURCE and counter.count("open the drawer") == 6
    assert calls == [{"local_files_only": True}, {}]


def test_offline_and_not_cached_falls_back_to_the_approximation(monkeypatch):
    calls = loads(monkeypatch, transformers.AutoTokenizer, OSError("not in the cache"),
                  OSError("We couldn't connect to 'https://huggingface.co' to load the files\nmore"))
    counter = load_token_counter(SOURCE)
    assert not counter.exact and counter.count("a b c") == 4 and len(calls) == 2
    assert counter.note == (f"tokenizer of {SOURCE!r} not available (We couldn't connect to 'https://huggingface.co' "
                            "to load the files); counts are approximate (1.3 x words)")


def test_broken_tokenizer_files_fall_back_to_the_approximation(monkeypatch):
    calls = loads(monkeypatch, transformers.AutoTokenizer, ValueError("Couldn't instantiate the backend tokenizer"))
    counter = load_token_counter(SOURCE)
    assert not counter.exact and "(Couldn't instantiate the backend tokenizer)" in counter.note
    assert calls == [{"local_files_only": True}]  # the local files exist: the hub would not do better


@pytest.mark.parametrize("outcomes", [
    (RuntimeError("a bug"),),
    (OSError("not in the cache"), RuntimeError("a bug")),
    (KeyError("vocab"),),
])
def test_other_failures_of_the_tokenizer_are_raised(monkeypatch, outcomes):
    loads(monkeypatch, transformers.AutoTokenizer, *outcomes)
    with pytest.raises(type(outcomes[-1])) as err:
        load_token_counter(SOURCE)
    assert err.value is outcomes[-1]


# -- the VLM -----------------------------------------------------------------------------------------------------


class Config:
    def __init__(self, model_type: str):
        self.model_type = model_type


@pytest.mark.parametrize("failure", [OSError("We couldn't connect to 'https://huggingface.co'.\nmore"),
                                     ValueError("Unrecognized model in some-owner/some-model.")])
def test_a_vlm_that_cannot_be_loaded_is_a_config_error(monkeypatch, failure):
    loads(monkeypatch, transformers.AutoConfig, failure)
    with pytest.raises(ConfigError) as err:
        VlmLabeler.load(SOURCE, device="cpu")
    first = str(failure).splitlines()[0].rstrip(".")
    assert str(err.value) == (f"cannot load the VLM {SOURCE!r}: {first}. Without hub access (HF_HUB_OFFLINE=1 or no "
                              "network) --vlm needs a local directory holding the model; leave out --vlm for "
                              "templated labels.")
    assert err.value.__cause__ is failure


def test_vlm_weights_that_do_not_load_are_a_config_error(monkeypatch):
    loads(monkeypatch, transformers.AutoConfig, Config("qwen3_vl"))
    failure = OSError("some-owner/some-model does not appear to have a file named model.safetensors")
    loads(monkeypatch, transformers.AutoModelForImageTextToText, failure)
    with pytest.raises(ConfigError, match="cannot load the VLM .* does not appear to have a file named") as err:
        VlmLabeler.load(SOURCE, device="cpu")
    assert err.value.__cause__ is failure


def test_a_model_that_is_no_qwen_vl_is_refused_before_loading_weights(monkeypatch):
    loads(monkeypatch, transformers.AutoConfig, Config("llama"))
    weights = loads(monkeypatch, transformers.AutoModelForImageTextToText)
    with pytest.raises(ConfigError, match=r"^--vlm 'some-owner/some-model' is a 'llama' model; supported: qwen3_vl, "
                                          r"qwen2_5_vl$"):
        VlmLabeler.load(SOURCE, device="cpu")
    assert weights == []


def test_other_failures_of_the_vlm_are_raised(monkeypatch):
    failure = RuntimeError("a bug")
    loads(monkeypatch, transformers.AutoConfig, failure)
    with pytest.raises(RuntimeError) as err:
        VlmLabeler.load(SOURCE, device="cpu")
    assert err.value is failure


def test_auto_device(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == resolve_device("auto") == "cpu"
    assert resolve_device("cuda:1") == "cuda:1" and resolve_device("cpu") == "cpu"
