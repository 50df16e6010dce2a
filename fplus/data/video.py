"""Video frames in and out of MP4 files with PyAV (no torchvision, no torchcodec).

LeRobot v3.0 concatenates many episodes into one MP4 per camera; an episode is the time span
[from_timestamp, to_timestamp) of that file, and its frame i sits at from_timestamp + i / fps.
"""

from __future__ import annotations

import os
import re
from fractions import Fraction
from pathlib import Path

import numpy as np

from fplus.errors import DataError, FplusError

RESTORE_VIDEO = "restore the file from the dataset's source (download or export the dataset again)"

# libx264 with a keyframe every 2 frames keeps random access cheap (seek + at most one extra decode).
H264_OPTIONS = {"crf": "18", "g": "2", "preset": "veryfast", "tune": "zerolatency"}


class VideoEncoder:
    """Append RGB frames (H, W, 3) uint8 to an H.264 MP4 at a constant frame rate; `close()` finishes the file."""

    def __init__(self, path: Path, fps: int, height: int, width: int, codec: str = "libx264"):
        import av

        if height % 2 or width % 2:
            raise DataError(f"video frames must have even height and width for yuv420p, got {height}x{width}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fps = fps
        self.shape = (height, width, 3)
        self._container = av.open(str(path), mode="w")
        self._stream = self._container.add_stream(codec, rate=fps, options=dict(H264_OPTIONS))
        self._stream.width = width
        self._stream.height = height
        self._stream.pix_fmt = "yuv420p"
        self._stream.time_base = Fraction(1, fps)
        self.frames_written = 0

    def write(self, frames: np.ndarray) -> None:
        """Encode frames (T, H, W, 3) uint8."""
        import av

        if frames.ndim != 4 or frames.shape[1:] != self.shape or frames.dtype != np.uint8:
            raise DataError(f"expected frames of shape (T, {self.shape}) uint8, got {frames.shape} {frames.dtype}")
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = self.frames_written
            vf.time_base = Fraction(1, self.fps)
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()

    def size_bytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0


def _error_text(err: Exception, path: Path) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = re.sub(r"^\[Errno -?\d+\] ", "", text)  # FFmpeg's error codes mean nothing to a reader
    return text.replace(f": '{path}'", "").replace(f"'{path}'", "the file")


def _undecodable(path: Path, where: str, t: float, err: Exception) -> FplusError:
    place = f" ({where})" if where else ""
    return FplusError(f"{path}{place}: video cannot be decoded near t={t:.3f}s of the file ({_error_text(err, path)}); "
                      f"{RESTORE_VIDEO}")


def _open_video(path: Path, where: str):
    """av.open for reading, with a missing file or one that is not a video an error naming it."""
    import av

    place = f" ({where})" if where else ""
    if not path.is_file():
        raise DataError(f"video file missing: {path}{place}; {RESTORE_VIDEO}")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as err:
        raise DataError(f"{path}{place}: not a readable video ({_error_text(err, path)}); {RESTORE_VIDEO}") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}{place}: holds no video stream; {RESTORE_VIDEO}")
    return container


def decode_span(path: Path, from_ts: float, to_ts: float, fps: float, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Decode every frame whose timestamp lies in [from_ts, to_ts) (half a frame of tolerance each side).

    Args:
        where: what the span is, for errors ("camera observation.images.image, episode 3").
    Returns:
        frames: (N, H, W, 3) uint8 RGB, in presentation order.
        times: (N,) float64 presentation times in seconds.
    Raises:
        FplusError: the file is missing or cannot be decoded (naming the file, `where` and the time).
    """
    import av

    half = 0.5 / fps
    frames: list[np.ndarray] = []
    times: list[float] = []
    t = from_ts
    with _open_video(path, where) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            if from_ts > half:
                container.seek(int((from_ts - half) / stream.time_base), stream=stream, backward=True,
                               any_frame=False)
            for frame in container.decode(stream):
                t = float(frame.pts * stream.time_base) if frame.pts is not None else float(frame.time)
                if t < from_ts - half:
                    continue
                if t >= to_ts - half:
                    break
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(t)
        except (av.error.FFmpegError, OSError) as err:
            raise _undecodable(path, where, times[-1] + 1 / fps if times else from_ts, err) from None
    if not frames:
        place = f" ({where})" if where else ""
        raise DataError(f"{path}{place}: no frames in [{from_ts:.3f}s, {to_ts:.3f}s); the video is shorter than "
                         f"the episode table says: {RESTORE_VIDEO}")
    return np.stack(frames), np.asarray(times)


def align_frames(frames: np.ndarray, times: np.ndarray, wanted: np.ndarray, fps: float, where: str) -> np.ndarray:
    """Pick, for each wanted timestamp (N,), the decoded frame closest in time; fail if none is within half a frame.

    Args:
        frames: (M, H, W, 3) decoded frames; times: (M,) their times; wanted: (N,) timestamps in seconds.
    Returns:
        (N, H, W, 3) uint8.
    """
    pos = np.clip(np.searchsorted(times, wanted), 1, len(times) - 1) if len(times) > 1 else np.zeros_like(wanted, int)
    if len(times) > 1:
        left_closer = np.abs(times[pos - 1] - wanted) <= np.abs(times[pos] - wanted)
        pos = np.where(left_closer, pos - 1, pos)
    error = np.abs(times[pos] - wanted)
    if np.any(error > 0.5 / fps + 1e-4):
        bad = int(np.argmax(error))
        raise DataError(
            f"{where}: no video frame near t={wanted[bad]:.4f}s (closest {times[pos[bad]]:.4f}s); "
            "the video and the parquet timestamps disagree"
        )
    return frames[pos]


class VideoReader:
    """Random access to single frames of MP4 files: seek to the keyframe before t, decode forward to t.

    Containers stay open (one per file) for the life of the reader, per process: a DataLoader worker (forked
    or spawned) never touches its parent's containers (sharing FFmpeg state across fork deadlocks).
    """

    def __init__(self):
        self._open: dict[str, object] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"_open": {}, "_pid": -1}

    def frame_at(self, path: Path, t: float, fps: float, where: str = "") -> np.ndarray:
        """The frame (H, W, 3) uint8 whose time is closest to t (within half a frame); `where` names it in errors."""
        import av

        if self._pid != os.getpid():  # inherited through fork: start afresh in this process
            self._open, self._pid = {}, os.getpid()
        key = str(path)
        container = self._open.get(key)
        if container is None:
            container = self._open[key] = _open_video(path, where)
        stream = container.streams.video[0]
        half = 0.5 / fps
        try:
            container.seek(max(0, int((t - half) / stream.time_base)), stream=stream, backward=True,
                           any_frame=False)
            for frame in container.decode(stream):
                ft = float(frame.pts * stream.time_base)
                if ft >= t - half:
                    if ft > t + half:
                        break
                    return frame.to_ndarray(format="rgb24")
        except (av.error.FFmpegError, OSError) as err:
            self._open.pop(key, None)
            raise _undecodable(path, where, t, err) from None
        place = f" ({where})" if where else ""
        raise DataError(f"{path}{place}: no video frame near t={t:.4f}s; {RESTORE_VIDEO}")
