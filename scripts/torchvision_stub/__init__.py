"""Stand-in for torchvision in fplus's @VENV_LABEL@ venv.

Copied from fplus's scripts/torchvision_stub/ by install_torchvision_stub (scripts/venv_lib.sh), which also fills in
the venv's label. PyPI's Linux torchvision wheels are CUDA builds: their _C.so links libtorch_cuda.so and
libc10_cuda.so, so `import torchvision` fails next to the CPU torch wheel ("operator torchvision::nms does not
exist"), and no CPU torchvision wheel or sdist is on PyPI. The dataset code of lerobot (0.3.3 and 0.4.4) and of
lerobot-dataset 0.4.4 (ledataset, a copy of lerobot 0.4.4's) imports torchvision at module level but needs only
`transforms.ToTensor` (for `image` features) and, for its "pyav" video backend, `set_video_backend` and
`io.VideoReader`, which torchvision itself no longer ships (0.28 has no VideoReader). Videos are decoded with
torchcodec (the default backend when it is importable) in these venvs.
"""

from . import io, transforms

__all__ = ["get_video_backend", "io", "set_video_backend", "transforms"]
__version__ = "0.0.0+@VENV_LABEL@-stub"
_video_backend = "pyav"


def set_video_backend(backend):
    raise RuntimeError(
        f"video backend {backend!r} needs torchvision.io.VideoReader, which this venv does not have "
        "(@VENV_LABEL@ stub); use video_backend='torchcodec'"
    )


def get_video_backend():
    return _video_backend
