"""`fplus doctor`: check the environment and a profile before spending GPU hours.

Each check returns a `Check(name, status, detail)` with status ok | warn | fail; the command exits non-zero when
any check fails. Nothing heavy is loaded: model sizes come from configs, never from weights.
"""

from __future__ import annotations

import importlib.metadata as md
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

from fplus.errors import FplusError
from fplus.settings import Settings

# Parameters of the backbones the aliases name (for a lower bound of the memory when the config is not at hand).
KNOWN_PARAMS = {"Qwen/Qwen3-VL-2B-Instruct": 2.13e9, "Qwen/Qwen3-VL-4B-Instruct": 4.4e9,
                "Qwen/Qwen3-VL-8B-Instruct": 8.8e9, "Qwen/Qwen2.5-VL-3B-Instruct": 3.8e9,
                "random-qwen3-vl-2b": 2.13e9, "random-qwen3-vl-4b": 4.4e9, "random-qwen3-vl-mid": 9.92e7}


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def check_versions() -> list[Check]:
    out = [Check("python", "ok" if tuple(map(int, platform.python_version_tuple()[:2])) >= (3, 11) else "fail",
                 platform.python_version())]
    for package in ("torch", "transformers", "accelerate", "peft", "av", "pyarrow", "pydantic-settings"):
        try:
            out.append(Check(package, "ok", md.version(package)))
        except md.PackageNotFoundError:
            out.append(Check(package, "fail", "not installed"))
    for package in ("metaworld", "mujoco"):
        try:
            out.append(Check(package, "ok", md.version(package)))
        except md.PackageNotFoundError:
            out.append(Check(package, "warn", "not installed (needed for closed-loop evaluation in that simulator)"))
    from fplus.sim.libero import INSTALL_HINT, installed_distribution

    libero = installed_distribution()
    out.append(Check("libero", "ok", f"{libero} {md.version(libero)}") if libero else
               Check("libero", "warn", f"not installed (closed loop in LIBERO): {INSTALL_HINT}"))
    try:
        md.version("torchvision")
        out.append(Check("torchvision", "warn", "installed; fplus never needs it"))
    except md.PackageNotFoundError:
        pass
    return out


def check_device() -> list[Check]:
    import torch

    if torch.cuda.is_available():
        checks = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            bf16 = torch.cuda.is_bf16_supported()
            checks.append(Check(f"cuda:{i}", "ok" if bf16 else "warn",
                                f"{torch.cuda.get_device_name(i)}, {total / 2**30:.0f} GiB ({free / 2**30:.0f} free), "
                                f"bf16 {'yes' if bf16 else 'no'}"))
        return checks
    return [Check("device", "warn", f"no CUDA GPU: CPU with {torch.get_num_threads()} threads (fine for the demo)")]


def check_dataset(settings: Settings) -> tuple[list[Check], object | None]:
    from fplus.data.lerobot import DataKeys
    from fplus.data.mixture import dataset_label, open_dataset

    d = settings.data
    if d.dataset is None:
        return [Check("dataset", "fail", "DATASET is not set")], None
    try:
        ds = open_dataset(d)  # one dataset, or a mixture (its members must agree on fps)
    except FplusError as err:
        missing = not Path(d.dataset).exists()
        status = "warn" if settings.run.make_demo_data and missing else "fail"
        hint = " (fplus matrix records it)" if status == "warn" else ""
        return [Check("dataset", status, f"{err}{hint}")], None
    try:
        checks = [Check("dataset", "ok", f"{dataset_label(ds)}: {ds.num_episodes} episodes, {ds.num_frames} frames, "
                                         f"{len(ds.tasks)} tasks, {ds.fps} fps")]
    except FplusError as err:  # a damaged episodes or tasks table
        return [Check("dataset", "fail", str(err))], None
    keys = DataKeys(image=d.image_key, wrist_image=d.wrist_image_key, state=d.state_key, action=d.action_key,
                    instruction=d.instruction_key)
    problems = ds.key_problems(keys)
    unset = [n for n, v in (("IMAGE_KEY", d.image_key), ("ACTION_KEY", d.action_key),
                            ("INSTRUCTION_KEY", d.instruction_key)) if v is None]
    if problems or unset:
        detail = "; ".join(problems + [f"{n} not set" for n in unset]) + f". Keys: {', '.join(ds.keys)}"
        checks.append(Check("dataset keys", "fail", detail))
    else:
        try:
            ds.validate_keys(keys)
            checks.append(Check("dataset keys", "ok", ", ".join(f"{k}={v}" for k, v in keys.named().items())))
        except FplusError as err:
            checks.append(Check("dataset keys", "fail", str(err)))
    try:
        values = ds.value_problems()
    except FplusError as err:  # a data file that cannot be read
        return checks + [Check("dataset values", "fail", str(err))], None
    floats = [k for k, f in ds.features.items() if f["dtype"].startswith("float")]
    if values:  # the later checks read the frame table, which refuses these values
        return checks + [Check("dataset values", "fail", "; ".join(values))], None
    return checks + [Check("dataset values", "ok", f"no NaN/inf in {', '.join(floats) or 'the float features'}")], ds


def check_latents(settings: Settings, ds, needs_world: bool) -> list[Check]:
    if not needs_world:
        return [Check("latents", "ok", "no experiment of this profile uses world latents")]
    if ds is None or settings.data.image_key is None:
        return [Check("latents", "warn", "not checked (no dataset)")]
    from fplus.world.cache import LatentsCorrupt, find_dataset_latents

    w = settings.world
    encoder = w.dino_model if w.source == "dino" else w.vjepa_model
    try:  # a mixture: every member's entry
        entries, latents = find_dataset_latents(w.cache_dir, ds, settings.data.image_key, w.source, encoder,
                                                w.pooling, w.temporal_window)
    except LatentsCorrupt as err:  # damaged, changed since written, NaN/inf, or unverifiable: recompute
        return [Check("latents", "fail", f"{err}")]
    except FplusError as err:  # not computed yet, unfinished, or made for another dataset version
        return [Check("latents", "warn", f"{err}")]
    return [latent_spread_check(f"{', '.join(map(str, entries))}: {latents.shape[0]} x {latents.shape[1]}", latents,
                                ds.episode_of_frames())]


def latent_spread_check(found: str, latents, episode_of) -> Check:
    """`warn` when the latents are degenerate (nearly one vector: fplus.world.stats), `ok` with the ratio otherwise."""
    from fplus.world.stats import DEGENERATE_RATIO, latent_spread

    s = latent_spread(latents, episode_of)
    if not s["degenerate"]:
        return Check("latents", "ok", f"{found}, spread ratio {s['ratio']:.3g} (between-frame std / mean norm; "
                                      f"degenerate below {DEGENERATE_RATIO})")
    consecutive = "" if s["cos_consecutive"] is None else f", {s['cos_consecutive']:.4f} between consecutive frames"
    return Check("latents", "warn", (
        f"{found}: degenerate latents (nearly one vector for every frame): between-frame std "
        f"{s['between_frame_std']:.3g} against a mean norm of {s['mean_norm']:.3g} (ratio {s['ratio']:.3g} < "
        f"{DEGENERATE_RATIO}), cosine {s['cos_random_pairs']:.4f} between random frames{consecutive}. fplus "
        "standardises the latents per dimension with the training split's statistics, so training still works, "
        "but cosine targets on the raw latents are trivial (predicting any frame's latent scores a cosine near 1): "
        "judge the Prophet in the standardised space against its baselines (`fplus report`)"))


def check_coc(settings: Settings, ds, needs_coc: bool) -> list[Check]:
    if not needs_coc:
        return [Check("CoC", "ok", "no experiment of this profile uses CoC")]
    path = settings.coc.jsonl
    if path is None or not Path(path).is_file():
        status = {"error": "fail", "skip": "warn", "generate": "warn"}[settings.run.missing_coc]
        return [Check("CoC", status, f"COC_JSONL {'unset' if path is None else f'{path} missing'} "
                                     f"(MATRIX_MISSING_COC={settings.run.missing_coc})")]
    from fplus.data.coc import read_coc

    coc = read_coc(Path(path), max_tokens=settings.coc.max_tokens)
    if coc.problems:
        return [Check("CoC", "fail", f"{len(coc.problems)} problems, e.g. {coc.problems[0]}")]
    if ds is None:
        return [Check("CoC", "ok", f"{len(coc.texts)} labelled episodes (coverage not checked)")]
    have = set(coc.texts) & {e.index for e in ds.episodes}
    status = "ok" if len(have) == ds.num_episodes else "fail"
    return [Check("CoC", status, f"{len(have)}/{ds.num_episodes} episodes labelled")]


def check_disk(settings: Settings) -> list[Check]:
    out = []
    for name, path in (("disk (runs)", settings.train.output_dir), ("disk (latents)", settings.world.cache_dir)):
        probe = Path(path).resolve()
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free / 2**30
        status = "ok" if free > 20 else "warn" if free > 2 else "fail"
        out.append(Check(name, status, f"{free:.0f} GiB free at {probe}"))
    return out


def check_memory(settings: Settings, per_experiment: dict[str, Settings]) -> list[Check]:
    """The memory one training process of the matrix's largest experiment needs (`fplus.memory.estimate_memory`,
    from the backbone's config; `settings` alone without experiments), against the GPU's when there is one."""
    from fplus.experiments import Experiment
    from fplus.memory import GPU_OVERHEAD, SizeUnknown, backbone_shape, estimate_memory

    per_experiment = per_experiment or {Experiment.of(settings).id: settings}
    try:
        shapes = {s.model.backbone: backbone_shape(s.model.backbone) for s in per_experiment.values()}
        estimates = {e: estimate_memory(s, shape=shapes[s.model.backbone]) for e, s in per_experiment.items()}
    except SizeUnknown as err:
        from fplus.model.backbone import resolve_name

        source = resolve_name(next(iter(per_experiment.values())).model.backbone)
        known = KNOWN_PARAMS.get(source)  # an optional table: a lower bound where it has the backbone
        bound = "" if known is None else \
            f"; at least {known * 4 / 2**30:.0f} GiB for the float32 weights of its ~{known / 1e9:.1f}B parameters"
        return [Check("est. memory", "warn", f"not estimated: {err}{bound}")]
    except FplusError as err:  # a BACKBONE that is no backbone
        return [Check("est. memory", "fail", str(err))]
    experiment, est = max(estimates.items(), key=lambda item: item[1].gpu_total)
    s = per_experiment[experiment]
    m = s.model
    cameras = 1 + (s.data.wrist_image_key is not None)
    gib = est.gpu_total / 2**30
    params = f"{est.params / 1e9:.2f}B" if est.params >= 1e9 else f"{est.params / 1e6:.1f}M"
    detail = (f"~{gib:.1f} GiB per training process on a GPU for {experiment} (the largest of "
              f"{', '.join(estimates)}): {est.components()} GiB, + {GPU_OVERHEAD:.0%} and the CUDA context; "
              f"{params} params ({est.trainable / 1e6:.1f}M trainable), {m.finetune}, {m.precision}, batch "
              f"{s.train.batch_size}, {cameras} camera(s) at {m.image_size} px, ~{est.tokens} tokens/sample"
              f"{', activation checkpointing' if m.gradient_checkpointing else ''}")
    status = "ok"
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        status = "ok" if gib < 0.9 * total else "fail"
        detail += f"; the GPU has {total:.0f} GiB"
    return [Check("est. memory", status, detail)]


def check_simulator(settings: Settings) -> list[Check]:
    """The closed-loop simulator of EVAL_SIM is installed (nothing to check when EVAL_SIM=none)."""
    sim = settings.eval.sim
    if sim == "none":
        return []
    from fplus.sim.registry import get_simulator

    try:
        get_simulator(sim).check_available()
    except FplusError as err:
        return [Check(f"sim {sim}", "fail", str(err))]
    detail = f"suite {settings.eval.suite}, {settings.eval.episodes} episodes per task" if sim == "libero" else \
        f"{settings.eval.episodes} episodes per task"
    return [Check(f"sim {sim}", "ok", detail)]


# Decoder layers of the backbones the aliases name (the loss-path check needs them without loading a config).
KNOWN_LAYERS = {"Qwen/Qwen3-VL-2B-Instruct": 28, "Qwen/Qwen3-VL-4B-Instruct": 36, "Qwen/Qwen3-VL-8B-Instruct": 36,
                "Qwen/Qwen2.5-VL-3B-Instruct": 36, "random-qwen3-vl-2b": 28, "random-qwen3-vl-4b": 36,
                "random-qwen3-vl-mid": 4, "tiny": 2}


def backbone_layers(name: str) -> int | None:
    """Decoder layers of a backbone from the table above or its config (local directory, or the hub cache);
    None when unknown (offline)."""
    from fplus.model.backbone import resolve_name

    source = resolve_name(name)
    if source in KNOWN_LAYERS:
        return KNOWN_LAYERS[source]
    try:
        from transformers import AutoConfig

        return int(AutoConfig.from_pretrained(source).get_text_config().num_hidden_layers)
    except (OSError, ValueError, KeyError):  # offline/not cached, or not a model: the check says it could not tell
        return None


def check_loss_paths(settings: Settings, per_experiment: dict[str, Settings]) -> list[Check]:
    """Every matrix experiment's active losses can reach a trainable weight (DESIGN 5): e.g. FLARE's ALIGN_LAYER
    must sit at or above the first LoRA layer. The same check the policy runs when it is built."""
    from fplus.model.config import PolicyConfig

    layers = backbone_layers(settings.model.backbone)
    if layers is None:
        return [Check("loss paths", "warn", f"not checked: the depth of {settings.model.backbone} is unknown here")]
    problems = []
    for experiment, exp in per_experiment.items():
        try:
            PolicyConfig.from_settings(exp, action_dim=1, state_dim=None, world_dim=1).check_loss_paths(layers)
        except FplusError as err:
            problems.append(f"{experiment}: {err}")
    if problems:
        return [Check("loss paths", "fail", "; ".join(problems))]
    return [Check("loss paths", "ok", f"every active loss of {', '.join(per_experiment)} reaches a "
                                      f"trainable weight ({settings.model.finetune}, {layers} layers)")]


def run_checks(settings: Settings, per_experiment: dict[str, Settings]) -> list[Check]:
    """Every check of a profile: `settings` its base settings, `per_experiment` what each matrix experiment runs
    with (`fplus.settings.matrix_settings`); which data the experiments need is asked of their specs."""
    from fplus.experiments import Experiment

    specs = [Experiment.of(s) for s in per_experiment.values()]
    needs_world = any(e.needs_world for e in specs)
    needs_coc = any(e.needs_coc for e in specs)
    checks = check_versions() + check_device() + check_loss_paths(settings, per_experiment)
    data_checks, ds = check_dataset(settings)
    checks += data_checks + check_latents(settings, ds, needs_world) + check_coc(settings, ds, needs_coc)
    checks += check_disk(settings) + check_simulator(settings) + check_memory(settings, per_experiment)
    return checks
