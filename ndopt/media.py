"""Writing generated videos: mp4 (ffmpeg through imageio-ffmpeg), GIF, or a PNG strip; atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ndopt.errors import NdoptError
from ndopt.io import atomic_path

FPS = 24  # Pyramid-Flow and Neodragon generate 24 fps video


def write_video(path: Path, frames: list[np.ndarray], fmt: str | None = None, fps: int = FPS) -> Path:
    fmt = (fmt or path.suffix.lstrip(".") or "mp4").lower()
    if fmt not in ("mp4", "gif", "png"):
        raise NdoptError(f"unknown video format {fmt!r}: use mp4, gif or png (a strip of the frames)")
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if fmt == "png":
            iio.imwrite(tmp, np.concatenate(frames, axis=1), extension=".png")
        elif fmt == "gif":
            iio.imwrite(tmp, np.stack(frames), extension=".gif", duration=1000 / fps, loop=0)
        else:
            # yuv420p needs even sizes; macro_block_size=1 keeps tiny 64x64 videos as they are
            iio.imwrite(tmp, np.stack(frames), extension=".mp4", plugin="pyav" if _has_pyav() else "FFMPEG",
                        fps=fps, **({} if _has_pyav() else {"macro_block_size": 1}))
    return path


def _has_pyav() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True
