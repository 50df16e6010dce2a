"""The model card (README.md) of an exported folder: YAML front matter for the hub (library_name, tags, datasets,
base_model), then the experiment, the dataset, the key settings, the run's offline and closed-loop results of the
exported step (tables from its result files) and how to load, serve and evaluate the folder. Torch-free: it reads
the JSON that fplus.deploy.export gathered.

    text = model_card(marker, training_config, {"offline-step-000120.json": {...}, "sim-libero-step-000120.json": ...})
"""

from __future__ import annotations

import json
import re
from typing import Any

SETTINGS = ("FINETUNE", "LORA_RANK", "LORA_LAYERS", "ACTION_HEAD", "FLOW_STEPS", "ACTION_HORIZON", "IMAGE_SIZE",
            "NORMALIZATION", "PROPHET", "INJECTION", "COC", "FLARE_ALIGN", "WORLD_SOURCE", "WORLD_HISTORY",
            "WORLD_FUTURE", "BATCH_SIZE", "GRAD_ACCUM", "MAX_EPOCHS", "MAX_STEPS", "LR_BACKBONE", "LR_HEADS",
            "LR_PROPHET", "SEED")
"""The settings the card lists where they apply (every setting is in training_config.json)."""
WORLD = ("PROPHET", "FLARE_ALIGN")
APPLIES = {"LORA_RANK": lambda f: f["FINETUNE"] == "lora", "LORA_LAYERS": lambda f: f["FINETUNE"] == "lora",
           "FLOW_STEPS": lambda f: f["ACTION_HEAD"] == "flow", "WORLD_SOURCE": lambda f: any(f[k] for k in WORLD),
           "WORLD_HISTORY": lambda f: f["PROPHET"], "WORLD_FUTURE": lambda f: any(f[k] for k in WORLD),
           "LR_PROPHET": lambda f: f["PROPHET"]}
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def _hub_id(text: str | None) -> str | None:
    return text if text and _HUB_ID.fullmatch(text) and not text.startswith((".", "/", "~")) else None


def _yaml_list(name: str, items: list[str]) -> list[str]:
    return [f"{name}:", *(f"- {json.dumps(i)}" for i in items)] if items else []


def front_matter(marker: dict[str, Any]) -> str:
    """The YAML header (JSON strings are YAML strings): datasets and base_model only where they are hub ids."""
    dataset = marker["dataset"]["repo_id"] or _hub_id(marker["dataset"]["id"])
    base = _hub_id(marker["backbone"]["source"])
    tags = ["robotics", "vision-language-action", "fplus", f"fplus-{marker['experiment'].lower()}", "lerobot"]
    if marker["world_encoder"] is not None:
        tags.append("world-model")
    lines = ["---", "library_name: fplus", "pipeline_tag: robotics", *_yaml_list("tags", tags),
             *_yaml_list("datasets", [dataset] if dataset else [])]
    if base:
        lines.append(f"base_model: {json.dumps(base)}")
    return "\n".join([*lines, "---"])


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "|".join("---" for _ in header) + "|", *(line(r) for r in rows)]


def _code(value: Any) -> str:
    return "`" + (json.dumps(value) if not isinstance(value, str) else value) + "`"


def offline_table(result: dict) -> list[str]:
    """One row per corruption mode: normalised MSE, its change from `none`, raw MSE, world cosine, samples."""
    base = result["modes"].get("none", {}).get("mse_norm")
    rows = []
    for mode, m in result["modes"].items():
        delta = "" if base is None or mode == "none" else f"{m['mse_norm'] - base:+.4g}"
        cos = "n/a" if m["cos_world"] is None else f"{m['cos_world']:.4f}"
        rows.append([mode, f"{m['mse_norm']:.4g}", delta, f"{m['mse_raw']:.4g}", cos, str(m["samples"])])
    return _table(["corruption", "MSE (norm.)", "Δ vs none", "MSE (raw)", "cos world", "samples"], rows)


def _rate(cell: dict | None) -> str:
    if cell is None or cell["successes"] is None:
        return "n/a"
    lo, hi = cell["ci95"]
    return f"{cell['rate']:.1%} [{lo:.1%}, {hi:.1%}] ({cell['successes']}/{cell['episodes']})"


def sim_table(result: dict) -> list[str]:
    """Success rate [95% interval] (successes/episodes) per task (rows) and corruption mode (columns), then all."""
    modes = list(result["overall"]) or list(next(iter(result["tasks"].values()), {}))
    rows = [[task, *(_rate(per_mode.get(m)) for m in modes)] for task, per_mode in result["tasks"].items()]
    rows.append(["**all**", *(_rate(result["overall"].get(m)) for m in modes)])
    return _table(["task", *modes], rows)


def _results(marker: dict, results: dict[str, dict]) -> list[str]:
    out = ["## Results", ""]
    if not results:
        return [*out, f"The run recorded no evaluation of step {marker['step']} before it was exported "
                      "(`fplus eval OUT` evaluates the folder offline).", ""]
    for name, result in results.items():
        if name.startswith("offline-"):
            out += [f"Offline, on the run's {marker['dataset']['val_episodes']} validation episodes: action MSE of "
                    f"the chunk under each memory corruption (`results/{name}`).", "", *offline_table(result), ""]
        else:
            suite = f" {result['suite']}" if result.get("suite") else ""
            out += [f"Closed loop in {result['simulator']}{suite}: success rate [95% Wilson interval] per task, "
                    f"{result['episodes_per_task']} episodes per task under `none`, {result['n_action_steps']} "
                    f"actions executed per chunk (`results/{name}`).", "", *sim_table(result), ""]
    return out


def _usage(marker: dict) -> list[str]:
    world = marker["world_encoder"]
    inputs = ["batch = policy.processor({", '    "images": images,              # (B, h, w, 3) uint8, main camera',
              '    "instructions": ["put the bowl on the plate"],']
    if marker["observation"]["state_key"]:
        inputs.append('    "state": state,                # (B, S) float32, raw')
    inputs.append("})")
    if world:
        inputs.append('batch["z_hist"] = z_hist              # (B, T, D) raw latents of the world encoder above')
    out = ["## Use", "", "```python", "from fplus.model.policy import FPlusPolicy", "",
           'policy = FPlusPolicy.from_pretrained("THIS_REPO_OR_FOLDER", device="cuda").eval()',
           *inputs, "actions = policy.predict(batch).actions  # (B, H, A) raw action units", "```", "",
           "A hub id is fetched with huggingface_hub (with `HF_HUB_OFFLINE=1` from the local cache); every file is "
           "checked against `fplus_export.json`. The backbone is loaded at the revision recorded above."]
    if world:
        out.append(f"The world encoder is not bundled: `{world['encoder_id']}` (revision `{world['revision']}`) "
                   "is loaded by id where the policy runs; `fplus serve` encodes the camera frames with it.")
    out += ["", "```bash", "fplus serve OUT --port 8000        # websocket server, openpi's protocol (docs/deploy.md)",
            "fplus eval OUT --corruption all    # offline, on the recorded dataset (or DATASET=...); writes OUT/eval/",
            "```", "", "Download a hub copy first with `hf download REPO_ID --local-dir OUT`. The closed loop "
            "(`fplus eval --sim`) runs on the run directory only.", ""]
    return out


def model_card(marker: dict[str, Any], training_config: dict[str, Any], results: dict[str, dict]) -> str:
    """README.md of the exported folder: `marker` (fplus_export.json), the run's config.json, the result files."""
    from fplus.rundir import settings_from_config
    from fplus.settings import settings_to_flat

    flat = settings_to_flat(settings_from_config(training_config, marker["run"]))  # every setting, resolved
    ds, obs, bb, world = marker["dataset"], marker["observation"], marker["backbone"], marker["world_encoder"]
    steps = f"{marker['step']}" + (f" of {marker['total_steps']}" if marker.get("total_steps") else "")
    memory = ", with a memory of future world latents predicted from the past ones" if world else ""
    intro = (f"{marker['experiment']}: {marker['experiment_description']}. The vision-language backbone reads the "
             "camera image(s), the instruction and action query tokens; an action head turns their hidden states "
             f"into a chunk of {flat['ACTION_HORIZON']} actions{memory}. Trained with fplus "
             f"{marker['fplus_version']}; exported at step {steps}.")
    title = f"# fplus {marker['experiment']} policy ({marker['run']}, step {marker['step']})"
    lines = [front_matter(marker), "", title, "", intro, "", "## Dataset", ""]
    keys = ", ".join(f"{name} `{obs[k]}`" for name, k in (("image", "image_key"), ("wrist", "wrist_image_key"),
                     ("state", "state_key"), ("action", "action_key"), ("instruction", "instruction_key")) if obs[k])
    lines += _table(["", ""], [
        ["dataset", _code(ds["id"]) + (f" at revision `{ds['revision']}`" if ds["revision"] else "")],
        ["fingerprint", _code(ds["fingerprint"])],
        ["episodes", f"{ds['episodes']} ({ds['train_episodes']} train, {ds['val_episodes']} validation), "
                     f"{ds['frames']} frames"],
        ["keys", keys], ["frame", " x ".join(str(n) for n in obs["image_shape"])],
        ["tasks", f"{len(obs['tasks'])}"]])
    lines += ["", "## Model", ""]
    rows = [["backbone", _code(bb["id"]) + (f" (`{bb['source']}`)" if bb["source"] != bb["id"] else "")
             + (f" at revision `{bb['revision']}`" if bb["revision"] else "")]]
    if world:
        rows.append(["world encoder", f"{world['source']} {_code(world['encoder_id'])} at revision "
                                      f"`{world['revision']}`, {world['dim']}-d latents (not bundled)"])
    rows += [[name, _code(flat[name])] for name in SETTINGS
             if flat[name] is not None and (name not in APPLIES or APPLIES[name](flat))]
    lines += _table(["setting", "value"], rows)
    lines += ["", "Every setting of the run is in `training_config.json`.", "", *_results(marker, results),
              *_usage(marker), "## Files", "",
              "`config.json` (policy config), `policy.safetensors` (heads, normalisers, latent statistics), "
              "`backbone_trainable.safetensors` (the backbone weights training changed), `processor/` (tokenizer, "
              "image processor), `normalization.json`, "
              + ("`latent_stats.json`, " if world else "")
              + "`training_config.json`, `split.json`, `results/`, `fplus_export.json` (provenance and file "
              "hashes).", ""]
    return "\n".join(lines)
