"""Shape buckets: the videos a user says they will generate, turned into the shapes every
network sees and into optimisation profiles (DESIGN.md 4). torch-free.

A bucket is ``HxWxF`` (pixels, frames), or ``HxWxFbN`` for up to N prompts generated as
one batch (runtime: a list of prompts). Through the VAE's frame formula and the DiT's
patch size it becomes, per network:

- ``text_encoder``: batch 2 (batched guidance: negative + positive prompt) or 1, times N;
- ``dit``: batch 2 or 1 (times N), latent frames, latent height and width (tokens = F' x
  H/16 x W/16);
- ``vae_decoder/<variant>``: batch 1 and the latent height and width, for each decoder
  variant the bucket's slice plan uses (the variants fix the temporal size);
- ``vae_encoder/<variant>``: the same for image-to-video (InP models).

Profiles: one static profile (min = opt = max) per bucket by default, except the batch of
an N-prompt bucket, which spans one prompt's batch to N prompts' (opt = max), so one
engine takes any batch of 1 .. N prompts; ``ranged`` gives one profile spanning all
buckets (min/opt/max per dimension, opt = the largest bucket).
Impossible buckets are refused before any work with the rule they break.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from ..errors import InputError
from ..export.spec import MAX_PROMPTS, ExportSpec, GraphKey, Profile, decoder_variant, encoder_key
from ..reference.config import ModelConfig

GUIDANCE = ("batched", "sequential")
_BUCKET = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*[xX]\s*(\d+)\s*(?:[bB]\s*(\d+))?\s*$")


@dataclass(frozen=True, order=True)
class Bucket:
    """One video shape: pixel height, width and frames; ``prompts``: how many prompts one
    batched call generates at this shape (1 .. MAX_PROMPTS)."""

    height: int
    width: int
    frames: int
    prompts: int = 1

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}" + (f"b{self.prompts}" if self.prompts > 1 else "")

    @classmethod
    def parse(cls, text: str) -> "Bucket":
        m = _BUCKET.match(text)
        if not m:
            raise InputError(f"a bucket is HEIGHTxWIDTHxFRAMES[bPROMPTS] (e.g. 384x672x144, or 64x64x17b4 for "
                             f"batches of up to 4 prompts), got {text!r}")
        h, w, f, n = m.groups()
        return cls(int(h), int(w), int(f), int(n) if n is not None else 1)


def parse_buckets(text: str | Sequence[str]) -> list[Bucket]:
    """``"384x672x144,512x512x1"`` (or a list of such) -> sorted unique buckets."""
    parts = [p for item in ([text] if isinstance(text, str) else text) for p in str(item).split(",") if p.strip()]
    if not parts:
        raise InputError("at least one bucket is needed (HEIGHTxWIDTHxFRAMES)")
    return sorted({Bucket.parse(p) for p in parts})


def check_bucket(config: ModelConfig, bucket: Bucket) -> None:
    """Raise InputError naming the rule a bucket breaks (before any export or build)."""
    if not 1 <= bucket.prompts <= MAX_PROMPTS:
        raise InputError(f"bucket {bucket.name}: prompts per batch must be 1 .. {MAX_PROMPTS}, got {bucket.prompts}")
    mult = config.pixel_multiple
    for name in ("height", "width"):
        v = getattr(bucket, name)
        if v <= 0 or v % mult:
            raise InputError(f"bucket {bucket.name}: {name} must be a positive multiple of {mult}, got {v}")
    try:
        config.vae.check_frames(bucket.frames)
    except InputError as exc:
        raise InputError(f"bucket {bucket.name}: {exc}") from None
    d = config.dit
    latent_frames = config.vae.latent_frames(bucket.frames)
    # The motion module's frame positions: Grid Reshape folds block^2 tokens per frame.
    positions = latent_frames * (d.temporal_block_size ** 2 if d.motion_module else 1)
    if d.motion_module and positions > d.temporal_max_positions:
        raise InputError(f"bucket {bucket.name}: {latent_frames} latent frames need {positions} temporal positions; "
                         f"the model's position table holds {d.temporal_max_positions}")


@dataclass(frozen=True)
class BucketShapes:
    """What one bucket means for each network: graph key -> dimension values."""

    bucket: Bucket
    dims: Mapping[str, Mapping[str, int]]
    tokens: int  # DiT tokens: latent frames x (latent height / patch) x (latent width / patch)
    # graph -> dimension -> the profile's min where it is below the bucket's value (the
    # batch of an N-prompt bucket)
    low: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


def bucket_shapes(config: ModelConfig, bucket: Bucket, guidance: str = "batched",
                  image_to_video: bool = False, step_cache: bool = False) -> BucketShapes:
    """The dimension values of every graph generation at ``bucket`` runs; with
    ``step_cache`` the DiT runs as ``dit_cache/head`` + ``dit_cache/tail`` (runtime/step_cache.py)."""
    if guidance not in GUIDANCE:
        raise InputError(f"guidance must be one of {list(GUIDANCE)}, got {guidance!r}")
    check_bucket(config, bucket)
    one = 2 if guidance == "batched" else 1  # one prompt's batch
    batch = one * bucket.prompts
    sc = config.vae.spatial_compression
    h, w = bucket.height // sc, bucket.width // sc
    lf = config.vae.latent_frames(bucket.frames)
    dims: dict[str, dict[str, int]] = {
        "text_encoder": {"batch": batch},
    }
    for key in (("dit_cache/head", "dit_cache/tail") if step_cache else ("dit",)):
        dims[key] = {"batch": batch, "frames": lf, "height": h, "width": w}
    for s in config.vae.slice_plan(lf):
        dims[f"vae_decoder/{decoder_variant(config, s)}"] = {"batch": 1, "height": h, "width": w}
    if image_to_video:
        for a, b in config.vae.frame_slices(bucket.frames):
            dims[str(encoder_key(b - a))] = {"batch": 1, "height": bucket.height, "width": bucket.width}
    p = config.dit.patch_size
    # the graphs a prompt batch widens: the text encoder and the DiT (whole or split)
    low = {k: {"batch": one} for k in dims if batch > one and GraphKey.parse(k).choice in ("text_encoder", "dit")}
    return BucketShapes(bucket, dims, lf * (h // p) * (w // p), low)


def profiles_for(spec: ExportSpec, shapes: Sequence[BucketShapes], ranged: bool = False
                 ) -> tuple[list[Profile], dict[str, int]]:
    """Optimisation profiles of one graph for the buckets that use it, and bucket name ->
    profile index. Static: one profile per distinct shape (buckets that give the graph the
    same shape share it; an N-prompt bucket's batch spans 1 .. N prompts); ranged: one
    profile over all."""
    used = [(s.bucket.name, dict(s.dims[spec.key])) for s in shapes if spec.key in s.dims]
    low = {s.bucket.name: dict(s.low.get(spec.key, {})) for s in shapes if spec.key in s.dims}
    if not used:
        return [], {}
    for name, dims in used:
        for d in spec.dims:
            if d.name not in dims:
                raise InputError(f"{spec.key}: bucket {name} gives no value for dimension {d.name!r}")
    if ranged:
        names = [d.name for d in spec.dims]
        lo = {n: min(low[name].get(n, dims[n]) for name, dims in used) for n in names}
        hi = {n: max(dims[n] for _, dims in used) for n in names}
        largest = max(used, key=lambda u: [u[1][n] for n in names])[1]
        profile = Profile("ranged", {n: (lo[n], largest[n], hi[n]) for n in names})
        return [profile], {name: 0 for name, _ in used}
    profiles: list[Profile] = []
    index: dict[str, int] = {}
    seen: dict[tuple, int] = {}
    for name, dims in used:
        key = (tuple(sorted(dims.items())), tuple(sorted(low[name].items())))
        if key not in seen:
            seen[key] = len(profiles)
            label = "x".join(str(dims[d.name]) for d in spec.dims)
            profiles.append(Profile(label, {n: (low[name].get(n, v), v, v) for n, v in dims.items()}))
        index[name] = seen[key]
    return profiles, index


def graphs_needed(shapes: Iterable[BucketShapes]) -> list[str]:
    """Graph keys some bucket runs, in a stable order."""
    keys: list[str] = []
    for s in shapes:
        for k in s.dims:
            if k not in keys:
                keys.append(k)
    order = {"text_encoder": 0, "dit": 1}
    return sorted(keys, key=lambda k: (order.get(k, 2), k))


def find_profile(profiles: Sequence[Profile], dims: Mapping[str, int]) -> int | None:
    """The first profile whose ranges hold ``dims``, or None."""
    for i, p in enumerate(profiles):
        if all(lo <= dims[n] <= hi for n, (lo, _, hi) in p.dims.items()):
            return i
    return None
