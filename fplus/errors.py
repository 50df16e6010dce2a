"""The user-facing errors: the CLI turns any of them into one line (the traceback only with FPLUS_DEBUG=1).

    FplusError            base: the message says what is wrong and how to fix it
      ConfigError         settings, profiles, experiment and model configuration, command-line arguments
      DataError           datasets, world-latent caches, CoC labels: a file, episode or key that is wrong or missing
      CheckpointError     run directories, checkpoints, saved policies: missing, damaged, foreign or incomplete
      SimulatorError      closed-loop simulators: not installed, cannot render, unknown task

Code raises the most specific kind; callers that only report errors catch FplusError.
"""


class FplusError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""


class ConfigError(FplusError):
    """Settings, profile, experiment or model configuration that cannot work (or a bad command-line argument)."""


class DataError(FplusError):
    """A dataset, latents cache or label file that is missing, damaged or does not fit the settings."""


class CheckpointError(FplusError):
    """A run directory, checkpoint or saved policy that is missing, damaged, foreign or incomplete."""


class SimulatorError(FplusError):
    """A closed-loop simulator that is not installed, cannot render, or does not know the task."""
