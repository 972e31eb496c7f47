"""The package's one video module: read, write, probe and cut videos, as uint8 arrays
(F, H, W, 3), with the ffmpeg binary that imageio-ffmpeg ships (gif and png through
imageio's pillow plugin). Every file is written to a temporary name and renamed.

- ``save_video`` / ``read_video``: generated videos (mp4 H.264 yuv420p CRF 18, gif, png).
- ``write_clip``: lossless clips (RGB H.264, qp 0, or one png) that read back exactly;
  the synthetic shapes world writes its training clips with it.
- ``to_uint8`` / ``from_uint8``: (3, F, H, W) tensors in [-1, 1] <-> uint8 frames
  (torch is imported only by these two).
- ``probe``, ``iter_frames``, ``read_frames_at``, ``keyframe_indices``, ``cut_clip``:
  the data pipeline's reading and cutting, described below.

Frame numbers everywhere in the data pipeline count decoded frames from 0, and a
frame's time is ``index / fps`` (constant-frame-rate sources; a variable-rate source is
treated as if it had its average rate).

Cutting (``cut_clip``) has two modes:
- ``"reencode"``: frame-exact. Accurate input seeking to half a frame before the
  first wanted frame, then exactly N frames re-encoded with libx264 (CRF 18).
- ``"auto"`` (default): a stream copy (no re-encoding, no quality loss, fast) where it
  is exact, else re-encode. A stream copy can only start on a keyframe, and with
  B-frames it can only end cleanly where the next GOP starts, so it is tried only when
  the clip's first frame is a keyframe of the source and its end is a keyframe or the
  end of the source. The copy is then checked (same frame count; first and last frames
  bit-identical to the source's) and replaced by a re-encode if the check fails.
  Encoders put keyframes at scene changes, which is where scene-split clips start and
  end, so whole scenes are often copied; pieces of a long scene are re-encoded.
Audio is dropped: the trainer uses video only.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from .errors import InputError
from .fileio import atomic_path

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CUT_MODES = ("auto", "reencode")
VIDEO_SUFFIXES = (".mp4", ".gif", ".png")


class VideoReadError(InputError):
    """A video file is missing, corrupt or has no decodable video stream."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _run_ffmpeg(args: list[str]) -> str:
    """Run ffmpeg with ``args``; return its stderr text; raise VideoReadError on failure."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", *args]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.decode("utf-8", errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-3:])
        raise VideoReadError(f"ffmpeg failed (exit {proc.returncode}): {tail}")
    return err


def probe(path: str | Path) -> VideoInfo:
    """Frame count (by decoding), fps and size of the first video stream."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise VideoReadError(f"video {path} does not exist")
    gen = imageio_ffmpeg.read_frames(str(path))
    try:
        meta = next(gen)
    except (OSError, RuntimeError, StopIteration) as e:
        raise VideoReadError(f"cannot read video {path}: {_first_line(e)}") from e
    finally:
        gen.close()
    fps = float(meta.get("fps") or 0.0)
    width, height = meta.get("size") or (0, 0)
    if fps <= 0 or width <= 0 or height <= 0:
        raise VideoReadError(f"cannot read video {path}: no fps or frame size in its header")
    try:
        frames, _ = imageio_ffmpeg.count_frames_and_secs(str(path))
    except RuntimeError as e:
        raise VideoReadError(f"cannot decode video {path}: {_first_line(e)}") from e
    if not frames:
        raise VideoReadError(f"video {path} has no decodable frames")
    return VideoInfo(frames=int(frames), fps=fps, width=int(width), height=int(height))


def _first_line(e: BaseException) -> str:
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def iter_frames(path: str | Path, gray: bool = False, start_frame: int = 0, fps: float | None = None
                ) -> Iterator[np.ndarray]:
    """Decode frames in order as uint8 arrays, (H, W, 3) RGB or (H, W) grey.

    ``start_frame`` > 0 seeks accurately (needs ``fps``); frames are yielded from there on.
    """
    import imageio_ffmpeg

    input_params: list[str] = []
    if start_frame > 0:
        if not fps:
            raise InputError("iter_frames needs fps to seek to a frame")
        # Half a frame early: the seek keeps the first frame whose time is >= the target.
        input_params = ["-ss", f"{(start_frame - 0.5) / fps:.6f}"]
    gen = imageio_ffmpeg.read_frames(
        str(path),
        pix_fmt="gray" if gray else "rgb24",
        bits_per_pixel=8 if gray else 24,
        input_params=input_params,
        output_params=["-fps_mode", "passthrough"],  # never duplicate or drop frames
    )
    try:
        try:
            meta = next(gen)
        except (OSError, RuntimeError, StopIteration) as e:
            raise VideoReadError(f"cannot read video {path}: {_first_line(e)}") from e
        width, height = meta["size"]
        shape = (height, width) if gray else (height, width, 3)
        try:
            for buf in gen:
                yield np.frombuffer(buf, dtype=np.uint8).reshape(shape)
        except RuntimeError as e:
            raise VideoReadError(f"cannot decode video {path}: {_first_line(e)}") from e
    finally:
        gen.close()  # stops ffmpeg when the caller stops early


def read_frames_at(path: str | Path, indices: Iterable[int], gray: bool = False) -> dict[int, np.ndarray]:
    """Decode the frames with the given indices (one sequential pass, stops after the last)."""
    wanted = sorted(set(int(i) for i in indices))
    out: dict[int, np.ndarray] = {}
    if not wanted:
        return out
    last = wanted[-1]
    want = set(wanted)
    for index, frame in enumerate(iter_frames(path, gray=gray)):
        if index in want:
            out[index] = frame.copy()
        if index >= last:
            break
    if len(out) != len(want):
        raise VideoReadError(f"video {path} ended before frame {last} ({len(out)} of {len(want)} read)")
    return out


_PTS_TIME = re.compile(r"pts_time:\s*(-?[0-9.]+)")


def keyframe_indices(path: str | Path, fps: float) -> list[int]:
    """Frame indices of the source's keyframes (decodes only the keyframes)."""
    err = _run_ffmpeg(["-skip_frame", "nokey", "-i", str(path), "-map", "0:v:0",
                       "-vf", "showinfo", "-f", "null", "-"])
    times = [float(m.group(1)) for m in _PTS_TIME.finditer(err)]
    if not times:
        return []
    t0 = min(times)
    return sorted({round((t - t0) * fps) for t in times})


def _tmp_name(dst: Path) -> Path:
    # Keep the suffix: ffmpeg picks the container from it.
    return dst.with_name(f".{dst.stem}.partial{dst.suffix}")


def _encode(src: Path, tmp: Path, start_frame: int, frames: int, fps: float) -> None:
    seek = ["-ss", f"{(start_frame - 0.5) / fps:.6f}"] if start_frame > 0 else []
    _run_ffmpeg(["-y", *seek, "-i", str(src), "-map", "0:v:0", "-frames:v", str(frames),
                 "-fps_mode", "passthrough", "-c:v", "libx264", "-preset", "veryfast",
                 "-crf", "18", "-pix_fmt", "yuv420p", "-an", "-loglevel", "error", str(tmp)])


def _copy(src: Path, tmp: Path, start_frame: int, frames: int, fps: float) -> None:
    # Seek a quarter frame past the keyframe so rounding can never land on the previous
    # one. The clip ends at a GOP boundary, so its first N packets in decode order are
    # exactly its N frames.
    seek = ["-ss", f"{(start_frame + 0.25) / fps:.6f}"] if start_frame > 0 else []
    _run_ffmpeg(["-y", *seek, "-i", str(src), "-map", "0:v:0", "-c", "copy", "-an",
                 "-frames:v", str(frames), "-avoid_negative_ts", "make_zero",
                 "-loglevel", "error", str(tmp)])


def _frame_at(path: Path, index: int, fps: float) -> np.ndarray:
    return next(iter_frames(path, start_frame=index, fps=fps))


def _copy_is_exact(src: Path, tmp: Path, start_frame: int, frames: int, fps: float) -> bool:
    import imageio_ffmpeg

    try:
        got, _ = imageio_ffmpeg.count_frames_and_secs(str(tmp))
        if got != frames:
            return False
        pairs = [(_frame_at(src, start_frame, fps), _frame_at(tmp, 0, fps)),
                 (_frame_at(src, start_frame + frames - 1, fps), _frame_at(tmp, frames - 1, fps))]
    except (RuntimeError, StopIteration, VideoReadError):
        return False
    return all(a.shape == b.shape and np.array_equal(a, b) for a, b in pairs)


def cut_clip(src: str | Path, dst: str | Path, start_frame: int, frames: int, fps: float,
             mode: str = "auto", keyframes: Iterable[int] | None = None,
             source_frames: int | None = None) -> tuple[str, int]:
    """Write frames [start_frame, start_frame + frames) of ``src`` to ``dst`` (atomically).

    Returns how the clip was made (``"copy"`` or ``"reencode"``) and how many frames it
    has (fewer than asked only if the source ended early). ``keyframes`` (the source's
    keyframe indices, ``keyframe_indices``) and ``source_frames`` enable the copy path.
    """
    import imageio_ffmpeg

    if mode not in CUT_MODES:
        raise InputError(f"cut mode must be one of {CUT_MODES}, got {mode!r}")
    if frames < 1 or start_frame < 0:
        raise InputError(f"a clip needs start_frame >= 0 and frames >= 1, got {start_frame}, {frames}")
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(dst)
    how = "reencode"
    try:
        keys = set(keyframes or ())
        end = start_frame + frames
        ends_cleanly = end in keys or (source_frames is not None and end >= source_frames)
        if mode == "auto" and start_frame in keys and ends_cleanly:
            _copy(src, tmp, start_frame, frames, fps)
            if _copy_is_exact(src, tmp, start_frame, frames, fps):
                how = "copy"
            else:
                logger.debug("stream copy of %s@%d not exact; re-encoding", src, start_frame)
        written = frames
        if how != "copy":
            _encode(src, tmp, start_frame, frames, fps)
            written, _ = imageio_ffmpeg.count_frames_and_secs(str(tmp))
            if not written:
                raise VideoReadError(f"cutting {src} at frame {start_frame} produced no frames")
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()
    return how, int(written)


# --- generated videos and lossless clips ------------------------------------------------


def to_uint8(video: "torch.Tensor") -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    import torch

    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def from_uint8(frames: np.ndarray) -> "torch.Tensor":
    """(F, H, W, 3) uint8 -> (3, F, H, W) float in [-1, 1]."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    return x.permute(3, 0, 1, 2)


def _check_frames(frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")


def check_output_path(path: str | Path) -> Path:
    """Refuse, before any work, an output the writer could not produce: a suffix other
    than .mp4/.gif/.png, a directory, or a folder that cannot be created or written."""
    path = Path(path)
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise InputError(f"output file must end in one of {list(VIDEO_SUFFIXES)}, got {path.name!r}")
    if path.is_dir():
        raise InputError(f"output path {path} is a directory; name a file ending in {list(VIDEO_SUFFIXES)}")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output folder {parent} is not a writable directory")
    return path


def frames_to_uint8(video: np.ndarray) -> np.ndarray:
    """(3, F, H, W) float in [-1, 1] -> (F, H, W, 3) uint8; numpy twin of ``to_uint8``
    (same float32 arithmetic, same round-half-to-even)."""
    x = np.rint((np.clip(np.asarray(video, np.float32), -1, 1) + np.float32(1)) * np.float32(127.5))
    return np.ascontiguousarray(x.astype(np.uint8).transpose(1, 2, 3, 0))


class VideoWriter:
    """Frames in, one file out, written as they come (mp4 streams into ffmpeg; gif and
    png keep what they need). The file appears only on ``close()``: an exception or
    Ctrl-C inside the ``with`` block leaves no partial output.

        with VideoWriter("out.mp4", fps=8) as w:
            for chunk in chunks:          # uint8 (n, H, W, 3)
                w.write(chunk)
    """

    def __init__(self, path: str | Path, fps: int):
        self.path = check_output_path(path)
        self.fps = fps
        self.suffix = self.path.suffix.lower()
        self.frames_written = 0
        self._atomic = atomic_path(self.path)
        self._tmp: Path | None = None
        self._ffmpeg = None
        self._kept: list[np.ndarray] = []

    def __enter__(self) -> "VideoWriter":
        self._tmp = self._atomic.__enter__()
        return self

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        _check_frames(frames)
        if self.suffix == ".mp4":
            if self._ffmpeg is None:
                import imageio_ffmpeg

                h, w = frames.shape[1:3]
                self._ffmpeg = imageio_ffmpeg.write_frames(
                    str(self._tmp), (w, h), fps=self.fps, codec="libx264", quality=None,
                    output_params=["-crf", "18", "-f", "mp4"], macro_block_size=1, pix_fmt_out="yuv420p")
                self._ffmpeg.send(None)
            for frame in frames:
                self._ffmpeg.send(np.ascontiguousarray(frame))
        elif self.suffix == ".gif" or not self._kept:
            self._kept.append(frames if self.suffix == ".gif" else frames[:1])
        self.frames_written += len(frames)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._finish()
            elif self._ffmpeg is not None:
                self._ffmpeg.close()
        finally:
            self._atomic.__exit__(exc_type, exc, tb)

    def _finish(self) -> None:
        if not self.frames_written:
            raise InputError(f"no frames to write to {self.path}")
        if self.suffix == ".mp4":
            self._ffmpeg.close()
            return
        import imageio.v3 as iio

        if self.suffix == ".gif":
            iio.imwrite(self._tmp, np.concatenate(self._kept), extension=".gif", duration=1000 / self.fps, loop=0)
        else:
            iio.imwrite(self._tmp, self._kept[0][0], extension=".png")


def save_video(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """Write frames (F, H, W, 3) uint8 to mp4, gif, or png (first frame; for 1-frame output)."""
    check_output_path(path)
    _check_frames(frames)
    with VideoWriter(path, fps) as writer:
        writer.write(frames)
    return Path(path)


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """(frames (F, H, W, 3) uint8, fps); a gif or png reads as 8 fps."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.exists():
        raise InputError(f"video file not found: {path}")
    if path.suffix.lower() == ".mp4":
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(str(path))
        meta = reader.__next__()
        w, h = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
        return np.stack(frames), float(meta["fps"])
    frames = iio.imread(path, index=None)
    if frames.ndim == 3:
        frames = frames[None]
    return np.ascontiguousarray(frames[..., :3]), 8.0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_image(path: str | Path) -> np.ndarray:
    """One RGB image as uint8 (H, W, 3) (an alpha channel is dropped, grey is expanded)."""
    import imageio.v3 as iio

    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise InputError(f"image file must end in one of {list(IMAGE_SUFFIXES)}, got {path.name!r}")
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    try:
        image = np.asarray(iio.imread(path))
    except Exception as exc:  # imageio raises many types for a broken file
        raise InputError(f"cannot read image {path}: {exc}") from None
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4) or image.dtype != np.uint8:
        raise InputError(f"image {path} must be 8-bit RGB(A), got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image[..., :3])


def write_clip(frames: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    """Write frames (F, H, W, 3) uint8 losslessly: ``.mp4`` (RGB H.264, qp 0) or ``.png``
    (1 frame). :func:`read_video` reads them back exactly."""
    path = Path(path)
    _check_frames(frames)
    suffix = path.suffix.lower()
    with atomic_path(path) as tmp:
        if suffix == ".png":
            if frames.shape[0] != 1:
                raise InputError(f"a .png clip holds one frame, got {frames.shape[0]}")
            import imageio.v3 as iio

            iio.imwrite(tmp, frames[0], extension=".png")
        elif suffix == ".mp4":
            f, h, w = frames.shape[:3]
            cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
                   "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", f"{fps:g}", "-i", "-",
                   "-c:v", "libx264rgb", "-qp", "0", "-preset", "veryfast", "-pix_fmt", "rgb24",
                   "-frames:v", str(f), "-f", "mp4", str(tmp)]
            proc = subprocess.run(cmd, input=np.ascontiguousarray(frames).tobytes(), capture_output=True)
            if proc.returncode != 0:
                tail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
                raise InputError(f"ffmpeg could not write {path}: {' '.join(tail)}")
        else:
            raise InputError(f"clip file must end in .mp4 or .png, got {path.name!r}")
    return path
