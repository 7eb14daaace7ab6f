"""Writing frames to mp4 (and gif) for people to watch."""

from __future__ import annotations

from pathlib import Path

import imageio.v2 as imageio
import numpy as np

from common.files import atomic_write


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


def write_video(path: str | Path, frames: np.ndarray, fps: int = 25, gif: bool = False) -> list[Path]:
    """Write (T, H, W, 3) uint8 frames as an mp4 (and a gif beside it), each atomically; returns the paths."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = upscale(np.asarray(frames, dtype=np.uint8))
    atomic_write(path, lambda tmp: imageio.mimwrite(tmp, frames, fps=fps, macro_block_size=1, codec="libx264",
                                                    quality=8), keep_suffix=True)
    written = [path]
    if gif:
        gif_path = path.with_suffix(".gif")
        atomic_write(gif_path, lambda tmp: imageio.mimwrite(tmp, frames[::2], duration=2000 / fps, loop=0),
                     keep_suffix=True)
        written.append(gif_path)
    return written
