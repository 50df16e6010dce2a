"""`load_backbone` of a hub id from the local hub cache, offline (DESIGN 9): the commit loaded is recorded as
`Backbone.revision`, an explicit revision pins the weights, and a missing id or revision fails in one line.

The fake cache has the layout huggingface_hub writes and reads (file_download.py: `try_to_load_from_cache`,
`hf_hub_download`): `models--<org>--<name>/blobs/<hash>` holds the files, `snapshots/<commit>/<file>` are relative
symlinks to the blobs, and `refs/main` holds the commit of main (no trailing newline).
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from fplus.errors import CheckpointError, ConfigError
from fplus.model.backbone import load_backbone, resolve_revision, save_backbone
from fplus.model.tiny import build_tiny

REPO = "fplus-test/tiny-vl"
H, M = 4, 2
PARAM = "model.language_model.layers.0.mlp.down_proj.weight"


def commit_of(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


def add_snapshot(cache: Path, repo: str, commit: str, shift: float = 0.0, move_main: bool = True) -> Path:
    """Write the tiny model (PARAM shifted by `shift`), tokenizer and image processor as snapshot `commit` of
    `repo` in the hub cache `cache`, the way a download leaves it; `move_main` points refs/main at it."""
    model, tokenizer, processor = build_tiny()
    with torch.no_grad():
        model.get_parameter(PARAM).add_(shift)
    staging = cache / f"staging-{commit}"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    processor.save_pretrained(staging)
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(staging)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if move_main:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / "main").write_text(commit)  # huggingface_hub writes no newline, and reads it unstripped
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache that huggingface_hub and transformers use, with hub access off.

    The env vars are what a fresh process reads; huggingface_hub copied them into its constants at import, so
    those are set too (they are what every lookup reads at call time)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def load(name, **kwargs):
    return load_backbone(name, action_horizon=H, num_fut_tokens=M, use_state=True, **kwargs)


def test_hub_id_records_the_commit_loaded_and_an_old_revision_loads_old_weights(hub_cache):
    old, new = commit_of("old"), commit_of("new")
    add_snapshot(hub_cache, REPO, old)
    first = load(REPO)
    assert (first.source, first.revision) == (REPO, old) and resolve_revision(REPO) == old
    pinned = load(REPO, revision=old)
    assert pinned.revision == old
    assert torch.equal(pinned.model.get_parameter(PARAM), first.model.get_parameter(PARAM))
    tiny = build_tiny()[0].get_parameter(PARAM)
    assert torch.equal(first.model.get_parameter(PARAM), tiny)  # the snapshot's weights, not a fresh init

    add_snapshot(hub_cache, REPO, new, shift=1.0)  # main moves on
    latest, again = load(REPO), load(REPO, revision=old)
    assert (latest.revision, again.revision) == (new, old) and resolve_revision(REPO, old) == old
    torch.testing.assert_close(latest.model.get_parameter(PARAM), tiny + 1.0, rtol=0, atol=0)
    assert torch.equal(again.model.get_parameter(PARAM), tiny)
    assert load(REPO, revision="main").revision == new
    # same tokens and ids at both commits
    assert again.act_token_ids == latest.act_token_ids and again.tokenizer.get_vocab() == latest.tokenizer.get_vocab()


def test_uncached_hub_id_or_revision_fails_in_one_line_saying_how_to_fix(hub_cache):
    with pytest.raises(ConfigError) as err:
        load("someone/not-downloaded")
    message = str(err.value)
    assert "\n" not in message and "'someone/not-downloaded'" in message and "HF_HUB_OFFLINE=1" in message
    assert "hf download someone/not-downloaded" in message and "local directory" in message
    add_snapshot(hub_cache, REPO, commit_of("only"))
    missing = commit_of("never downloaded")
    with pytest.raises(ConfigError) as err:
        resolve_revision(REPO, missing)
    assert "\n" not in str(err.value) and missing in str(err.value) and f"--revision {missing}" in str(err.value)


def test_local_sources_have_no_revision(tmp_path):
    directory = save_backbone(load("tiny"), tmp_path / "bb")
    assert load("tiny").revision is None and load(str(directory)).revision is None
    assert resolve_revision("tiny") is None and resolve_revision(str(directory)) is None
    with pytest.raises(ConfigError, match="not a hub id"):
        load("tiny", revision=commit_of("x"))


def test_a_directory_that_is_not_a_saved_backbone_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not a saved backbone"):
        load(str(tmp_path))  # empty
    model, tokenizer, _ = build_tiny()
    model.save_pretrained(tmp_path / "half")
    tokenizer.save_pretrained(tmp_path / "half")  # no image processor
    with pytest.raises(CheckpointError, match="not a saved backbone.*missing or damaged"):
        load(str(tmp_path / "half"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a saved backbone.*not a valid JSON"):
        load(str(tmp_path / "foreign"))


def test_an_unsupported_model_type_is_a_config_error(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path)
    with pytest.raises(ConfigError, match="model type 'bert' is not supported"):
        load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    with pytest.raises(ConfigError, match="no-such-model"):
        load(str(tmp_path))


def test_a_fresh_process_reads_the_cache_named_by_hf_home(tmp_path):
    """The faithful path: only HF_HOME and HF_HUB_OFFLINE set, read by huggingface_hub at import."""
    old, new = commit_of("old"), commit_of("new")
    add_snapshot(tmp_path / "hub", REPO, old)
    add_snapshot(tmp_path / "hub", REPO, new, shift=1.0)
    script = (
        "import json; from fplus.model.backbone import load_backbone as load; "
        f"a = load({REPO!r}, action_horizon=1, num_fut_tokens=0, use_state=False); "
        f"b = load({REPO!r}, action_horizon=1, num_fut_tokens=0, use_state=False, revision={old!r}); "
        f"p = lambda bb: bb.model.get_parameter({PARAM!r}).sum().item(); "
        "print(json.dumps([a.revision, b.revision, p(a) - p(b)]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    latest, pinned, diff = json.loads(out.stdout.strip().splitlines()[-1])
    numel = build_tiny()[0].get_parameter(PARAM).numel()
    assert (latest, pinned) == (new, old) and diff == pytest.approx(numel, rel=1e-4)
