"""Validate profiles/accelerate/deepspeed.yaml with DeepSpeed's own config parser, without a GPU.

Builds the DeepSpeed config a training run would hand to `deepspeed.initialize`, as accelerate builds it:
`accelerate launch --config_file CONFIG` turns the yaml into ACCELERATE_* variables (accelerate's own launch code,
run here without launching), `DeepSpeedPlugin()` reads them (with the yaml's mixed precision), the recipe fills
the batch size and clipping from the settings (fplus.train.distributed.deepspeed_settings) and accelerate fills the
remaining `auto` values as its `_prepare_deepspeed` does; then `deepspeed.runtime.config.DeepSpeedConfig` parses
it for the given number of processes. Prints the resolved values; exit status 1 with DeepSpeed's message if the
config is refused.

DeepSpeed is not a dependency of fplus (it is installed on GPU machines only). It installs on a CPU machine from
its source distribution without CUDA packages, reusing the project's torch, in a throwaway venv:

    python -m venv /tmp/ds-venv
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \
        > /tmp/ds-venv/lib/python3.11/site-packages/project.pth
    /tmp/ds-venv/bin/pip install hjson ninja py-cpuinfo einops wheel setuptools
    DS_BUILD_OPS=0 /tmp/ds-venv/bin/pip install --no-deps --no-build-isolation deepspeed
    /tmp/ds-venv/bin/python scripts/check_deepspeed_config.py [--profile h100] [--num-processes 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def accelerate_deepspeed_config(config_file: Path, num_processes: int, batch_size: int, grad_accum: int,
                                max_grad_norm: float) -> dict:
    """The DeepSpeed config dict accelerate would pass to deepspeed.initialize for a run with these settings."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    from fplus.train.distributed import deepspeed_settings

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "--num_processes",
                                               str(num_processes), "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)  # as accelerate's launch_command sets it
    _, env = prepare_deepspeed_cmd_env(args)
    os.environ.update({k: v for k, v in env.items() if k.startswith("ACCELERATE_")})
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])  # as AcceleratorState does
    deepspeed_settings(plugin.deepspeed_config, batch_size, max_grad_norm)  # what fplus.train.distributed.prepare sets
    # what Accelerator._prepare_deepspeed fills for a model and a torch optimiser
    plugin.fill_match("gradient_accumulation_steps", must_match=False, gradient_accumulation_steps=grad_accum)
    micro = plugin.get_value("train_micro_batch_size_per_gpu")
    plugin.deepspeed_config_process(must_match=False, **{
        "gradient_clipping": 1.0, "zero_optimization.stage3_gather_16bit_weights_on_model_save": False,
        "train_micro_batch_size_per_gpu": micro,
        "train_batch_size": micro * plugin.get_value("gradient_accumulation_steps") * num_processes})
    plugin.deepspeed_config["zero_allow_untested_optimizer"] = True
    return plugin.deepspeed_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-file", type=Path, default=REPO / "profiles" / "accelerate" / "deepspeed.yaml")
    parser.add_argument("--profile", default="h100", help="fplus settings profile for BATCH_SIZE, GRAD_ACCUM, "
                                                          "MAX_GRAD_NORM")
    parser.add_argument("--num-processes", type=int, default=8)
    a = parser.parse_args()

    from deepspeed.runtime.config import DeepSpeedConfig

    from fplus.settings import load_settings

    t = load_settings(a.profile, {}, environ={}, dotenv=None).train
    config = accelerate_deepspeed_config(a.config_file, a.num_processes, t.batch_size, t.grad_accum, t.max_grad_norm)
    auto = [k for k, v in config.items() if v == "auto"] + \
        [f"{k}.{n}" for k, v in config.items() if isinstance(v, dict) for n, x in v.items() if x == "auto"]
    print(json.dumps(config, indent=2))
    if auto:
        print(f"REFUSED: `auto` values left that nothing fills: {auto}")
        return 1

    import deepspeed.runtime.config as ds_config

    ds_config.dist.get_world_size = lambda *args, **kwargs: a.num_processes  # the launch's world, no process group
    ds_config.dist.get_rank = lambda *args, **kwargs: 0
    try:
        parsed = DeepSpeedConfig(config)
    except Exception as err:  # DeepSpeed's own refusal, whatever its type
        print(f"REFUSED by DeepSpeed's parser: {type(err).__name__}: {err}")
        return 1
    print(f"OK: DeepSpeedConfig accepted {a.config_file.name} for {a.num_processes} processes "
          f"(profile {a.profile}): zero stage {parsed.zero_optimization_stage}, bf16 {parsed.bfloat16_config.enabled}, "
          f"micro batch {parsed.train_micro_batch_size_per_gpu}, gradient accumulation "
          f"{parsed.gradient_accumulation_steps}, train batch {parsed.train_batch_size}, "
          f"gradient clipping {parsed.gradient_clipping}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
