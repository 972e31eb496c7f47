"""Upstream's smoothed decode (``decode="smooth"``), without torch: the reference pipeline
and the runtime both stream through :func:`iter_smoothed`, on torch tensors or numpy
arrays alike.

Upstream EasyAnimate's ``decode_latents`` (V2 and V3, text-to-video and inpaint
pipelines) clamps the decoded video to [-1, 1] and runs ``smooth_output``: the frames
without the first E // 2 and the last E - E // 2 (E = the encoder's slice,
``mini_batch_encoder``: 8 frames for V3, 9 for V2) are encoded again and decoded, and
that second decode is averaged with the first over those frames, then clamped again.
The re-encoded window is shifted by half a slice, so its slice boundaries fall inside
the first decode's slices: the answer to the seam every slice. A video no longer than
one encoder slice is left as it is.

Two differences from upstream, both deliberate: the re-encode uses the posterior mean
where upstream draws ``.sample()`` (as the rest of this pipeline does: a seed gives one
video, with no second noise stream); and nothing is held whole. Frames stream out in
order as soon as both decodes of a frame exist: the pending frames are at most about
three slices, and the re-encoded latents are dropped once no decoder context needs them,
so memory does not grow with the video's length (upstream holds the whole video twice).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Iterator, Sequence

from ..errors import InputError, ShapeError

DECODE_MODES = ("plain", "smooth")

Array = Any  # a torch tensor or a numpy array, (1, channels, frames, height, width)


def check_decode(mode: Any) -> str:
    if mode not in DECODE_MODES:
        raise InputError(f"decode must be one of {list(DECODE_MODES)}, got {mode!r}")
    return mode


def smooth_window(config, frames: int) -> tuple[int, int] | None:
    """The pixel frames [lo, hi) that are encoded and decoded again, or None when the video
    is no longer than one encoder slice (upstream returns it unchanged)."""
    e = config.slice_frames
    if frames <= e:
        return None
    return e // 2, frames - (e - e // 2)


def iter_smoothed(plain: Iterable[Array], frames: int, config, encode: Callable[[Array], Array],
                  decode: Callable[[Array, Any], Array], cat: Callable[[Sequence[Array]], Array]) -> Iterator[Array]:
    """Smoothed frames, in order, from the plain decode's chunks.

    ``plain``: the first decode's chunks (1, 3, n, H, W), not clamped, ``frames`` in all;
    ``encode(x)``: one encoder slice (``config.frame_slices``) -> its scaled latents;
    ``decode(context, spec)``: one decoder slice (``config.slice_plan``) -> its frames;
    ``cat``: concatenation along the frame axis (dim 2). Yields chunks in [-1, 1].
    """
    window = smooth_window(config, frames)
    if window is None:
        for chunk in plain:
            yield chunk.clip(-1, 1)
        return
    lo, hi = window
    slices = deque(config.frame_slices(hi - lo))            # re-encode slices, window-relative
    plan = deque(config.slice_plan(config.latent_frames(hi - lo)))
    pending: deque = deque()   # plain frames (clamped) not yet out, from frame `out`
    to_encode: list = []       # window frames not yet encoded
    latents: dict[int, Array] = {}  # re-encoded latent frames by index, dropped when no context needs them
    n_latents = 0
    middle: deque = deque()    # the window's second decode, from window frame `out - lo`
    seen = out = 0

    def frames_of(x: Array) -> list:
        return [x[:, :, k:k + 1] for k in range(x.shape[2])]

    def advance() -> None:
        nonlocal n_latents
        while slices and len(to_encode) >= slices[0][1] - slices[0][0]:
            a, b = slices.popleft()
            z = encode(cat(to_encode[:b - a]))
            del to_encode[:b - a]
            for f in frames_of(z):
                latents[n_latents] = f
                n_latents += 1
        while plan and plan[0].ctx_end <= n_latents:
            spec = plan.popleft()
            middle.extend(frames_of(decode(cat([latents[k] for k in range(spec.ctx_start, spec.ctx_end)]), spec)))
            keep = plan[0].ctx_start if plan else n_latents
            for k in [k for k in latents if k < keep]:
                del latents[k]

    def ready() -> list:
        nonlocal out
        run = []
        while pending:
            if lo <= out < hi:
                if not middle:
                    break
                run.append(((pending.popleft() + middle.popleft()) / 2).clip(-1, 1))
            else:
                run.append(pending.popleft())
            out += 1
        return run

    for chunk in plain:
        chunk = chunk.clip(-1, 1)
        for f in frames_of(chunk):
            pending.append(f)
            if lo <= seen < hi:
                to_encode.append(f)
            seen += 1
        advance()
        run = ready()
        if run:
            yield cat(run)
    if seen != frames or pending or middle or slices or plan:
        raise ShapeError(f"smoothed decode: the plain decode gave {seen} frames for a {frames}-frame video "
                         f"({len(pending)} frames left unmatched)")
