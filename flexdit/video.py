"""Videos a person can open: looping GIFs (Pillow), MP4 where a local ffmpeg exists, PNG frame strips and grids,
and decoding video latents (B, C, F, H, W) frame by frame.

Frames are uint8 (F, H, W, C) with C 1 (grey) or 3 (RGB), as `decode_video` returns them per video.
"""
import math
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from flexdit.errors import FlexDiTError
from flexdit.io import atomic_write
from flexdit.sampling import decode, image_grid

GAP = 2  # image_grid's white gap between pictures
MAX_GIF_FPS = 50  # GIF delays are whole centiseconds, and players slow down delays under 2 cs
DECODE_CHUNK = 16  # frames per VAE call: bounds the decoder's activations whatever the video length


def check_frames(frames: np.ndarray) -> np.ndarray:
    """frames uint8 (F, H, W, C), C 1 or 3, at least one frame; returned unchanged."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        found = frames.dtype if isinstance(frames, np.ndarray) else type(frames).__name__
        raise FlexDiTError(f"video frames must be a uint8 numpy array, got {found}; decode them with decode_video")
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3) or frames.shape[0] < 1:
        raise FlexDiTError(f"video frames must have shape (F, H, W, C) with C 1 or 3 and F >= 1, got "
                           f"{tuple(frames.shape)}")
    return frames


def _check_fps(fps: float, most: float = math.inf) -> None:
    if not 0 < fps <= most:
        raise FlexDiTError(f"fps must be positive{'' if most == math.inf else f' and at most {most}'}, got {fps}")


# --- GIF ------------------------------------------------------------------------------------------------
def save_gif(frames: np.ndarray, path: str | Path, fps: float = 8) -> None:
    """Frames (F, H, W, C) as a looping GIF, written atomically. Grey frames are stored exactly; RGB frames are
    reduced to a 256-colour palette per frame. Pillow merges identical consecutive frames into one longer one
    (the animation plays the same)."""
    from PIL import Image

    frames = check_frames(frames)
    _check_fps(fps, MAX_GIF_FPS)
    pictures = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
    duration = max(20, round(1000 / fps / 10) * 10)  # ms, in whole centiseconds as GIF stores them

    def write(tmp: Path) -> None:
        pictures[0].save(tmp, format="GIF", save_all=True, append_images=pictures[1:], duration=duration, loop=0)

    atomic_write(path, write)


# --- MP4 ------------------------------------------------------------------------------------------------
def ffmpeg_exe() -> str | None:
    """The ffmpeg binary: imageio-ffmpeg's bundled one, else `ffmpeg` on PATH; None where neither exists."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return shutil.which("ffmpeg")
    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError:  # the package without its binary
        return shutil.which("ffmpeg")


def mp4_available() -> bool:
    return ffmpeg_exe() is not None


def save_mp4(frames: np.ndarray, path: str | Path, fps: float = 8) -> None:
    """Frames (F, H, W, C) as an H.264 MP4 (yuv420p, which every player reads; odd sides are padded by one
    black pixel), written atomically through a local ffmpeg."""
    frames = check_frames(frames)
    _check_fps(fps)
    exe = ffmpeg_exe()
    if exe is None:
        raise FlexDiTError("writing MP4 needs ffmpeg: pip install imageio-ffmpeg, or install ffmpeg on PATH "
                           "(or write a GIF instead)")
    f, h, w, _ = frames.shape
    rgb = np.ascontiguousarray(np.broadcast_to(frames, (f, h, w, 3)))  # (F, H, W, 3): grey repeated
    command = [exe, "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
               "-r", f"{fps:g}", "-i", "-", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264",
               "-pix_fmt", "yuv420p", "-f", "mp4"]

    def write(tmp: Path) -> None:
        try:
            done = subprocess.run([*command, str(tmp)], input=rgb.tobytes(), capture_output=True)
        except OSError as e:
            raise FlexDiTError(f"cannot run ffmpeg ({exe}): {e.strerror}; reinstall it or write a GIF") from None
        if done.returncode != 0:
            reason = (done.stderr.decode(errors="replace").strip().splitlines() or [f"exit {done.returncode}"])[-1]
            raise FlexDiTError(f"ffmpeg could not write {path}: {reason}; an ffmpeg with libx264 "
                               "(pip install imageio-ffmpeg) writes MP4, or write a GIF")

    atomic_write(path, write)


# --- strips and grids -----------------------------------------------------------------------------------
def video_grid(videos: np.ndarray) -> np.ndarray:
    """(N, F, H, W, C) uint8 -> one image, a video per row and its frames left to right, with image_grid's
    2-pixel white gaps and border: (N * (H + 2) + 2, F * (W + 2) + 2, C)."""
    if videos.ndim != 5:
        raise FlexDiTError(f"videos must have shape (N, F, H, W, C), got {tuple(videos.shape)}")
    n, f = videos.shape[:2]
    frames = check_frames(videos.reshape(n * f, *videos.shape[2:]))
    return image_grid(frames, columns=f)


def frame_strip(frames: np.ndarray) -> np.ndarray:
    """(F, H, W, C) uint8 -> (H, F * W + 2 * (F - 1), C): the frames side by side, 2-pixel white gaps between
    them (a row of video_grid without its border)."""
    return video_grid(check_frames(frames)[None])[GAP:-GAP, GAP:-GAP]


def save_png(image: np.ndarray, path: str | Path) -> None:
    """An (H, W, C) uint8 image (C 1 or 3), e.g. a video_grid, as a PNG written atomically."""
    from PIL import Image

    check_frames(image[None])
    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))


# --- decoding -------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_video(latents: torch.Tensor, vae=None, chunk: int = DECODE_CHUNK) -> np.ndarray:
    """Latents (B, C, F, H, W) -> uint8 videos (B, F, H', W', C'), each frame through flexdit.sampling.decode
    (pixel models with 1 or 3 channels need no VAE), `chunk` frames per decoder call."""
    if latents.ndim != 5:
        raise FlexDiTError(f"video latents must have shape (B, C, F, H, W), got {tuple(latents.shape)}; "
                           "decode images with flexdit.sampling.decode")
    if chunk < 1:
        raise FlexDiTError(f"chunk must be at least 1 frame, got {chunk}")
    b, c, f, h, w = latents.shape
    frames = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)  # (B * F, C, H, W), video-major
    images = np.concatenate([decode(frames[k:k + chunk], vae) for k in range(0, b * f, chunk)])  # (B * F, H', W', C')
    return images.reshape(b, f, *images.shape[1:])
