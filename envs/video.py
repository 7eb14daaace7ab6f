"""Writing frames to mp4 (and gif) for people to watch."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from common.files import atomic_write
from common.process import raise_if_stopped


def upscale(frames: np.ndarray, min_size: int = 256) -> np.ndarray:
    """Nearest-neighbour upscale of (T, H, W, 3) frames so small renders stay watchable."""
    k = max(1, -(-min_size // frames.shape[1]))
    return frames.repeat(k, axis=1).repeat(k, axis=2) if k > 1 else frames


def check_ffmpeg() -> str:
    """The ffmpeg that mp4s need, found before any work is done (not after it); a clear error otherwise."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError, OSError) as exc:
        raise RuntimeError(f"writing mp4 videos needs ffmpeg, which is not found ({exc}); `pip install imageio-ffmpeg` "
                           f"provides it") from None


def write_video(path: str | Path, frames, fps: int = 25, gif: bool = False) -> list[Path]:
    """Write uint8 frames (T, H, W, 3), or an iterable of such chunks (streamed: a long video need not fit in
    memory), as an mp4 and, with ``gif``, a gif of every second frame beside it, each atomically; returns the
    paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = [frames] if isinstance(frames, np.ndarray) else frames
    written = [path, path.with_suffix(".gif")] if gif else [path]

    def write(mp4: Path, gif_tmp: Path | None) -> None:
        count = 0
        with ExitStack() as writers:
            video = writers.enter_context(imageio.get_writer(mp4, fps=fps, macro_block_size=1, codec="libx264",
                                                             quality=8))
            animation = None if gif_tmp is None else writers.enter_context(
                imageio.get_writer(gif_tmp, duration=2000 / fps, loop=0))
            for chunk in chunks:
                raise_if_stopped()  # a stop signal that came while ffmpeg started is swallowed there
                for frame in upscale(np.asarray(chunk, dtype=np.uint8)):
                    video.append_data(frame)
                    if animation is not None and count % 2 == 0:
                        animation.append_data(frame)
                    count += 1
        if not count:
            raise ValueError(f"{path}: no frames to write")

    atomic_write(path, lambda tmp: atomic_write(written[1], lambda gif_tmp: write(tmp, gif_tmp), keep_suffix=True)
                 if gif else write(tmp, None), keep_suffix=True)
    return written
