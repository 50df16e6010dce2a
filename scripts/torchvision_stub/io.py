"""No video or image IO in the @VENV_LABEL@ torchvision stand-in; see torchvision/__init__.py."""


class VideoReader:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision.io.VideoReader is not available (@VENV_LABEL@ stub); use torchcodec")
