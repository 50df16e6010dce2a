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
    rgb = _RGB()
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
                frames.append(rgb(frame))
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


_INHERITED: list[dict] = []  # the open files of VideoReaders inherited through fork, kept from being freed


class _OpenVideo:
    """One file held open by a VideoReader: its container, its keyframe times (the demuxer's index, read with the
    file's header), a colour converter kept across frames, and where decoding stands (the frames iterator after the
    last seek and the last frame it gave)."""

    def __init__(self, container):
        self.container = container
        self.stream = container.streams.video[0]
        # one frame at a time: the decoder's frame threads would only delay it (and compete with the workers)
        self.stream.codec_context.thread_count = 1
        self.time_base = float(self.stream.time_base)
        self.keyframes = np.array(sorted(e.timestamp for e in self.stream.index_entries if e.is_keyframe), np.int64)
        self.rgb = _RGB()
        self.frames = None
        self.pts: int | None = None
        self.last: np.ndarray | None = None

    def keyframe_before(self, pts: int) -> int | None:
        """The last keyframe at or before `pts` (None: the file has no index, or none before)."""
        i = int(np.searchsorted(self.keyframes, pts, side="right"))
        return int(self.keyframes[i - 1]) if i else None


class _RGB:
    """Frames to (H, W, 3) uint8 RGB through one converter kept across frames, on the calling thread. PyAV's
    `to_ndarray(format="rgb24")` makes a new converter for every frame, each with its own pool of one thread per
    core: 10x the conversion's time, threads that fight torch's for the cores, and a pool that a forked DataLoader
    worker cannot free (it waits forever for the parent's threads)."""

    def __init__(self):
        from av.video.reformatter import VideoReformatter

        self.reformatter = VideoReformatter()

    def __call__(self, frame) -> np.ndarray:
        return self.reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()


class VideoReader:
    """Random access to single frames of MP4 files: seek to the keyframe before t and decode forward to t, or, when
    t lies ahead of the last frame decoded with no keyframe in between (the next frames of an episode), decode on
    without seeking.

    Containers stay open (one per file) for the life of the reader, per process: a DataLoader worker (forked
    or spawned) never touches its parent's containers, nor frees them (sharing FFmpeg state across fork deadlocks).
    """

    def __init__(self):
        self._open: dict[str, _OpenVideo] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {"_open": {}, "_pid": -1}

    def frame_at(self, path: Path, t: float, fps: float, where: str = "") -> np.ndarray:
        """The frame (H, W, 3) uint8 whose time is closest to t (within half a frame); `where` names it in errors.
        The array may be returned again for the same frame: do not write to it."""
        import av

        if self._pid != os.getpid():  # inherited through fork: start afresh in this process, and never free the
            _INHERITED.append(self._open)  # parent's FFmpeg objects here (that can wait for threads that are not)
            self._open, self._pid = {}, os.getpid()
        key = str(path)
        video = self._open.get(key)
        if video is None:
            video = self._open[key] = _OpenVideo(_open_video(path, where))
        tb = video.time_base
        lo, hi, target = (t - 0.5 / fps) / tb, (t + 0.5 / fps) / tb, round(t / tb)
        if video.pts is not None and lo <= video.pts <= hi:
            return video.last
        keyframe = video.keyframe_before(target)
        # t ahead, and its keyframe at most a frame past the last frame decoded: decoding on costs no more than a seek
        ahead = video.pts is not None and video.pts < lo and keyframe is not None \
            and keyframe <= video.pts + 1 / (fps * tb)
        video.pts = None  # where decoding stands is known again once a frame is returned
        try:
            if not ahead:
                video.container.seek(max(0, target if keyframe is None else keyframe), stream=video.stream,
                                     backward=True, any_frame=False)
                video.frames = video.container.decode(video.stream)
            for frame in video.frames:
                if frame.pts >= lo:
                    if frame.pts > hi:
                        break
                    video.last, video.pts = video.rgb(frame), frame.pts
                    return video.last
        except (av.error.FFmpegError, OSError) as err:
            self._open.pop(key, None)
            video.container.close()
            raise _undecodable(path, where, t, err) from None
        video.frames = None
        place = f" ({where})" if where else ""
        raise DataError(f"{path}{place}: no video frame near t={t:.4f}s; {RESTORE_VIDEO}")
