import numpy as np
import torch

from fplus import batch as K
from fplus.data.lerobot import DataKeys
from fplus.train.data import EpochSampler, PolicySamples, collate
from tests.helpers import CAM, write_toy_dataset

KEYS = DataKeys(image=CAM, state="observation.state", action="action", instruction="task")


def test_samples_preloaded_equal_samples_decoded_on_demand(tmp_path):
    ds = write_toy_dataset(tmp_path / "ds", lengths=(6, 9))
    latents = np.arange(ds.num_frames * 3, dtype=np.float16).reshape(-1, 3)
    a = PolicySamples(ds, KEYS, [0, 1], horizon=4, history=3, future=2, latents=latents, preload=True)
    b = PolicySamples(ds, KEYS, [0, 1], horizon=4, history=3, future=2, latents=latents, preload=False)
    assert len(a) == 15
    for i in (0, 5, 6, 14):
        sa, sb = a[i], b[i]
        assert torch.equal(sa[K.IMAGES], sb[K.IMAGES])
        assert torch.equal(sa[K.ACTIONS], sb[K.ACTIONS])
    s = a[5]  # last frame of episode 0: the chunk pads, the future is invalid, the history ends at t
    assert s[K.ACTION_PAD].tolist() == [False, True, True, True]
    assert s[K.FUTURE_VALID].tolist() == [False, False]
    assert s[K.Z_HIST][:, 0].tolist() == [9.0, 12.0, 15.0]
    assert s[K.INSTRUCTIONS] == "move the square right" and s[K.STATE].shape == (2,)
    batch = collate([a[0], a[7]])
    assert batch[K.IMAGES].shape == (2, 64, 64, 3) and batch[K.INSTRUCTIONS][1] == "move the square down"


def test_epoch_sampler_is_seeded_sharded_and_resumable():
    full = list(EpochSampler(10, seed=3, epoch=1))
    assert sorted(full) == list(range(10)) and full == list(EpochSampler(10, seed=3, epoch=1))
    assert full != list(EpochSampler(10, seed=3, epoch=2))
    assert list(EpochSampler(10, seed=3, epoch=1, start=4)) == full[4:]
    r0, r1 = list(EpochSampler(9, 3, 1, rank=0, world=2)), list(EpochSampler(9, 3, 1, rank=1, world=2))
    assert len(r0) == len(r1) == 5 and set(r0) | set(r1) == set(range(9))


class CountingSeeks:
    """A container that counts its seeks (every other attribute is the real container's)."""

    seeks = 0

    def __init__(self, container):
        self._container = container

    def seek(self, *args, **kwargs):
        CountingSeeks.seeks += 1
        return self._container.seek(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._container, name)


def bframe_video(path, n: int = 40, fps: int = 10) -> np.ndarray:
    """An H.264 file with B-frames (decode order differs from display order: the index's times are not the frames')
    and a keyframe every 12 frames; returns its frames decoded in order (n, 32, 32, 3)."""
    import av

    from fplus.data.video import decode_span

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps, options={"g": "12", "bf": "3", "crf": "20"})
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    frames, times = decode_span(path, 0.0, n / fps, fps)
    assert len(frames) == n and np.allclose(times, np.arange(n) / fps)
    return frames


def test_single_frames_in_any_order_are_the_decoded_episode_and_next_frames_need_no_seek(tmp_path, monkeypatch):
    from fplus.data import video

    frames = bframe_video(tmp_path / "b.mp4")
    opener = video._open_video
    monkeypatch.setattr(video, "_open_video", lambda path, where: CountingSeeks(opener(path, where)))
    reader = video.VideoReader()
    rng = np.random.default_rng(1)
    orders = {"shuffled": rng.permutation(40), "in order": np.arange(40), "backwards": np.arange(40)[::-1],
              "repeats and skips": np.array([3, 3, 4, 6, 5, 30, 31, 0, 39, 38])}
    seeks = {}
    for name, order in orders.items():
        CountingSeeks.seeks = 0
        for i in order:
            assert np.array_equal(reader.frame_at(tmp_path / "b.mp4", i / 10, 10), frames[i]), (name, i)
        seeks[name] = CountingSeeks.seeks
    # in order: one seek, then the next frames decoded on; backwards: a seek each (but the first: the last frame
    # read in order is kept); 3 3 4 6 | 5 | 30 31 | 0 | 39 | 38: a seek where the frame is behind or past a keyframe
    assert {k: v for k, v in seeks.items() if k != "shuffled"} == {"in order": 1, "backwards": 39,
                                                                   "repeats and skips": 5}
    assert seeks["shuffled"] > 30


def test_on_demand_frames_decoded_in_the_training_process_then_in_forked_workers(tmp_path):
    """Frames read in this process first (NUM_WORKERS=0, or validation), then by forked workers: the workers start
    their own decoders and never free this process's (that deadlocked)."""
    from torch.utils.data import DataLoader

    ds = write_toy_dataset(tmp_path / "ds", lengths=(6, 9, 7))
    samples = PolicySamples(ds, KEYS, [0, 1, 2], horizon=2, history=1, future=1, preload=False)
    want = PolicySamples(ds, KEYS, [0, 1, 2], horizon=2, history=1, future=1, preload=True)
    first = collate([samples[i] for i in range(len(samples))])
    loader = DataLoader(samples, batch_size=22, collate_fn=collate, num_workers=2, timeout=30)
    (batch,) = list(loader)
    assert torch.equal(batch[K.IMAGES], first[K.IMAGES])
    assert torch.equal(batch[K.IMAGES], collate([want[i] for i in range(22)])[K.IMAGES])
