"""Upstream EasyAnimate model directories -> a :class:`ModelConfig` (DESIGN.md 1.5, 1.6).

A released directory states part of its architecture in ``transformer/config.json``
(the PixArt-style sizes, ``in_channels`` 12 for InP models) and ``vae/config.json``
(channels, block types, ``slice_compression_vae`` and the chunk sizes). The motion
module settings are not in the files (upstream passes them from its yaml at load time),
so a preset supplies them. Rules:

- every field the files state is read, and the model is built with it (sizes, channels,
  block types, mid-block layout...); a value this implementation does not support is an
  error naming the file, the field and the value;
- the preset supplies what the files do not state (the motion module), so it must be of
  the release the files describe: a preset that disagrees with a stated *release* field
  (V2 chunked causal VAE vs V3 slice VAE, InP inputs, motion-module keys a config
  carries) is an error, never a silently different model;
- without ``--preset`` the release is inferred only when the files say it: the VAE's
  ``slice_compression_vae`` and the DiT's input channels (every V3 release is InP), or
  the motion-module keys when a config carries them. Otherwise the error asks for
  ``--preset`` and says why.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping

from ..errors import CheckpointError, ConfigError
from .config import PRESETS, DiTConfig, ModelConfig, TextEncoderConfig, VAEConfig, from_preset

log = logging.getLogger(__name__)

#: upstream block type -> our resample type
_DOWN_TYPES = {"SpatialDownBlock3D": "spatial", "SpatialTemporalDownBlock3D": "spacetime", "DownBlock3D": "none"}
_UP_TYPES = {"SpatialUpBlock3D": "spatial", "SpatialTemporalUpBlock3D": "spacetime", "UpBlock3D": "none"}
#: release sizes: DiT sample_size -> preset suffix
_SIZES = {64: "512", 96: "768", 120: "960"}
#: upstream CLIPProjection input width (hard-wired upstream for in_channels == 12)
CLIP_CHANNELS = 768
#: fields that say which release a directory is; a preset must agree with the files on them
RELEASE_DIT_FIELDS = ("inpaint_channels", "clip_channels", "hybrid_global_attention", "temporal_num_heads",
                      "temporal_block_size")  # (enable_uvit is the file's to say: honoured, not matched)
RELEASE_VAE_FIELDS = ("slicing", "padding_mode", "slice_frames")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _require(file: Path, raw: Mapping[str, Any], key: str, allowed: tuple) -> None:
    if key in raw and raw[key] not in allowed:
        raise CheckpointError(f"{file}: {key}={raw[key]!r} is not supported (supported: {list(allowed)})")


# --- what the files say -----------------------------------------------------------------------


def dit_fields(file: Path, raw: Mapping[str, Any]) -> dict[str, Any]:
    """DiTConfig fields stated by an upstream ``transformer/config.json``."""
    for key, allowed in (("norm_type", ("ada_norm_single",)), ("patch_3d", (False,)), ("fake_3d", (False,)),
                         ("casual_3d", (False,)), ("qk_norm", (False,)), ("after_norm", (False,)),
                         ("time_position_encoding_before_transformer", (False,)),
                         ("activation_fn", ("gelu-approximate",)), ("attention_bias", (True,)),
                         ("norm_elementwise_affine", (False,)),
                         ("motion_module_type", ("Vanilla", "VanillaGrid")),
                         ("basic_block_type", ("motionmodule", "global_motionmodule"))):
        _require(file, raw, key, allowed)
    out: dict[str, Any] = {k: raw[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim",
                                               "patch_size", "sample_size", "caption_channels") if k in raw}
    out["skip_wiring"] = "upstream"  # 13 skips, blocks 0-12 into 15 onward, whatever the depth (as upstream runs)
    if "norm_eps" in raw:
        out["norm_eps"] = float(raw["norm_eps"])
    latent = 4
    if "in_channels" in raw:
        cin = raw["in_channels"]
        if cin == latent:
            out.update(in_channels=latent, inpaint_channels=0, clip_channels=0)
        elif cin == 3 * latent:  # InP: noisy + mask + masked-video latents, and a CLIP projection
            out.update(in_channels=latent, inpaint_channels=2 * latent, clip_channels=CLIP_CHANNELS)
        else:
            raise CheckpointError(f"{file}: in_channels={cin!r} is not supported (4, or 12 for an InP model)")
    if "out_channels" in raw:
        if raw["out_channels"] not in (latent, 2 * latent):
            raise CheckpointError(f"{file}: out_channels={raw['out_channels']!r} is not supported (4 or 8)")
        out["learn_sigma"] = raw["out_channels"] == 2 * latent
    if "enable_uvit" in raw:
        out["long_skips"] = bool(raw["enable_uvit"])
    if "basic_block_type" in raw:
        out["hybrid_global_attention"] = raw["basic_block_type"] == "global_motionmodule"
    kwargs = raw.get("motion_module_kwargs_even") or raw.get("motion_module_kwargs")
    _check_motion_kwargs(file, raw, kwargs)
    if kwargs:
        out["temporal_num_heads"] = kwargs.get("num_attention_heads", 8)
        out["temporal_block_size"] = kwargs.get("block_size", 2 if raw.get("motion_module_type") == "VanillaGrid" else 1)
        if "temporal_position_encoding_max_len" in kwargs:
            out["temporal_max_positions"] = kwargs["temporal_position_encoding_max_len"]
    elif "motion_module_type" in raw:
        out["temporal_block_size"] = 2 if raw["motion_module_type"] == "VanillaGrid" else 1
    return out


#: motion-module settings this implementation runs as upstream does only at these values
#: (upstream's MotionModule arguments): any other stated value changes the output, so it
#: is refused rather than loaded silently
_MOTION_FIXED = {"temporal_position_encoding": (True,), "remove_time_embedding_in_photo": (False,),
                 "qk_norm": (False,), "temporal_attention_dim_div": (1,)}


def _check_motion_kwargs(file: Path, raw: Mapping[str, Any], even: Mapping[str, Any] | None) -> None:
    """The motion-module kwargs of the even (and odd) blocks: only the values this DiT
    runs; the odd blocks' may differ from the even blocks' only where the hybrid module
    does (its second attention), never in heads or Grid Reshape."""
    odd = raw.get("motion_module_kwargs_odd")
    for name, kwargs in (("motion_module_kwargs_even" if "motion_module_kwargs_even" in raw
                          else "motion_module_kwargs", even), ("motion_module_kwargs_odd", odd)):
        for key, allowed in _MOTION_FIXED.items():
            if kwargs and key in kwargs and kwargs[key] not in allowed:
                raise CheckpointError(f"{file}: {name}.{key}={kwargs[key]!r} is not supported (this DiT runs "
                                      f"{key}={allowed[0]!r})")
    if odd and even:
        for key, default in (("num_attention_heads", 8), ("block_size", 1)):
            if odd.get(key, default) != even.get(key, default):
                raise CheckpointError(f"{file}: motion_module_kwargs_odd.{key}={odd.get(key, default)!r} differs from "
                                      f"the even blocks' {even.get(key, default)!r}; per-parity motion-module "
                                      f"{key} is not supported")


def vae_fields(file: Path, raw: Mapping[str, Any]) -> dict[str, Any]:
    """VAEConfig fields stated by an upstream ``vae/config.json`` (AutoencoderKLMagvit)."""
    for key, allowed in (("mid_block_type", ("MidBlock3D",)), ("mid_block_attention_type", ("3d",)),
                         ("mid_block_num_attention_heads", (1,)), ("num_attention_heads", (1,)),
                         ("act_fn", ("silu",)), ("use_gc_blocks", (None,))):
        _require(file, raw, key, allowed)
    out: dict[str, Any] = {k: raw[k] for k in ("in_channels", "out_channels", "latent_channels",
                                               "layers_per_block", "norm_num_groups") if k in raw}
    if "layers_per_block" in raw:
        out["mid_block_layers"] = raw["layers_per_block"]  # upstream's mid block rule
    if "block_out_channels" in raw:
        out["block_out_channels"] = tuple(raw["block_out_channels"])
    elif "ch_mult" in raw:
        out["block_out_channels"] = tuple(int(raw.get("ch", 128)) * int(m) for m in raw["ch_mult"])
    for key, table, ours in (("down_block_types", _DOWN_TYPES, "down_block_types"),
                             ("up_block_types", _UP_TYPES, "up_block_types")):
        if raw.get(key) is not None:
            types = raw[key]
            if isinstance(types, str):  # upstream stores a tuple's repr in some versions
                types = [t.strip(" '\"") for t in types.strip("()[]").split(",") if t.strip()]
            unknown = [t for t in types if t not in table]
            if unknown:
                raise CheckpointError(f"{file}: {key} {unknown} are not supported (supported: {sorted(table)})")
            # upstream builds the last level without a resampler whatever its type says
            out[ours] = tuple(table[t] for t in types[:-1]) + ("none",)
    if "mid_block_use_attention" in raw:
        out["mid_block_attention"] = bool(raw["mid_block_use_attention"])
    if "scaling_factor" in raw:
        out["scaling_factor"] = float(raw["scaling_factor"])
    if raw.get("use_tiling"):
        log.warning("%s: upstream tiles VAE encode/decode above 256 px (use_tiling); this reference "
                    "decodes whole slices, so at larger sizes frames differ from upstream's near tile seams", file)
    if "slice_compression_vae" in raw:
        sliced = bool(raw["slice_compression_vae"])
        out.update(slicing="slice" if sliced else "chunk", padding_mode="slice" if sliced else "causal")
        if "mini_batch_encoder" in raw:
            out["slice_frames"] = int(raw["mini_batch_encoder"])
        if "mini_batch_decoder" in raw:  # latents per decoded slice: what the slicing gives, or refused
            frames = out.get("slice_frames", 8 if sliced else 9)
            latents = frames // 4 if sliced else (frames - 1) // 4 + 1
            if raw["mini_batch_decoder"] != latents:
                raise CheckpointError(f"{file}: mini_batch_decoder={raw['mini_batch_decoder']!r} is not supported: "
                                      f"{'slices' if sliced else 'chunks'} of {frames} frames decode {latents} "
                                      f"latents at a time here")
    return out


# --- presets vs files ---------------------------------------------------------------------------


def infer_preset(path: Path, dit: Mapping[str, Any], vae: Mapping[str, Any]) -> str:
    """The release preset the files identify (its size from ``sample_size`` where that is
    a release size), or a CheckpointError asking for ``--preset``."""
    reasons = []
    version = None
    if "hybrid_global_attention" in dit and "temporal_num_heads" in dit:
        version = "v3" if dit["hybrid_global_attention"] else "v2"
    elif "slicing" in vae and "inpaint_channels" in dit:
        v3_vae, inp = vae["slicing"] == "slice", dit["inpaint_channels"] > 0
        if v3_vae == inp:  # V2: chunked VAE + 4 channels; V3 releases: slice VAE + InP
            version = "v3" if v3_vae else "v2"
        else:
            reasons.append(f"its VAE is {'V3 (slice)' if v3_vae else 'V2 (chunked causal)'} but its DiT "
                           f"{'is' if inp else 'is not'} InP, which matches no release")
    else:
        reasons.append("neither vae/config.json (slice_compression_vae) with transformer/config.json "
                       "(in_channels) nor motion-module keys say whether it is V2 or V3")
    if version is None:
        raise CheckpointError(
            f"cannot tell which EasyAnimate release {path} is: {'; '.join(reasons)}. The motion-module "
            f"settings are not stored in the files, so pass --preset (one of "
            f"{sorted(p for p in PRESETS if p.startswith('v'))})")
    name = f"{version}-{_SIZES.get(dit.get('sample_size'), '512')}"
    return name if name in PRESETS else f"{version}-512"  # sizes come from the files anyway


def _merge(base: Any, stated: Mapping[str, Any], release_fields: tuple[str, ...], file: Path, preset: str,
           passed: bool = True) -> Any:
    """``base`` with every field the file states; a release field that differs is an error
    (naming the preset when one was passed, the inferred release otherwise)."""
    clashes = [f"{k}: file {v!r}, {'preset' if passed else 'release'} {getattr(base, k)!r}" for k, v in stated.items()
               if k in release_fields and getattr(base, k) != v]
    if clashes:
        if passed:
            raise CheckpointError(f"{file} describes another release than preset {preset!r} ({'; '.join(clashes)}); "
                                  f"pass the preset of this model, or none to infer it from the files")
        raise CheckpointError(f"{file} matches no EasyAnimate release: its files point to {preset!r}, but "
                              f"{'; '.join(clashes)}; pass --preset to say which release it is")
    return dataclasses.replace(base, **stated)


def scheduler_fields(path: Path) -> dict[str, Any]:
    """DiTConfig overrides from ``scheduler/config.json`` (its prediction type); a schedule
    other than the one the samplers implement is refused rather than silently misused."""
    from .samplers import NoiseSchedule

    file = path / "scheduler" / "config.json"
    raw = _read(file)
    if not raw:
        return {}
    schedule = NoiseSchedule()  # the training schedule every sampler here assumes
    expected = {"num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
                "beta_end": schedule.beta_end, "beta_schedule": "linear"}
    for key, want in expected.items():
        got = raw.get(key, want)
        if got != want and not (isinstance(want, float) and isinstance(got, (int, float))
                                and abs(got - want) <= 1e-12):
            raise CheckpointError(f"{file}: {key}={got!r} is not supported (the samplers implement "
                                  f"{key}={want!r})")
    return {"prediction_type": raw["prediction_type"]} if "prediction_type" in raw else {}


def _release(path: Path, preset: str | None, dit: Mapping[str, Any], vae: Mapping[str, Any]) -> ModelConfig:
    return from_preset(preset if preset is not None else infer_preset(path, dit, vae))


def dit_config(path: str | Path, preset: str | None = None) -> tuple[str, DiTConfig]:
    """(preset, DiTConfig) of an upstream directory's ``transformer/`` alone."""
    path = Path(path)
    file = path / "transformer" / "config.json"
    if not file.exists():
        raise CheckpointError(f"{path} has no transformer/config.json")
    dit = dit_fields(file, _read(file))
    vae_file = path / "vae" / "config.json"
    vae = vae_fields(vae_file, _read(vae_file))
    base = _release(path, preset, dit, vae)
    merged = _merge(base.dit, dit, RELEASE_DIT_FIELDS, file, base.name, passed=preset is not None)
    return base.name, dataclasses.replace(merged, **scheduler_fields(path))


def vae_config(path: str | Path, preset: str | None = None) -> tuple[str, VAEConfig]:
    """(preset, VAEConfig) of an upstream directory's ``vae/`` alone."""
    path = Path(path)
    file = path / "vae" / "config.json"
    vae = vae_fields(file, _read(file))
    dit_file = path / "transformer" / "config.json"
    dit = dit_fields(dit_file, _read(dit_file))
    base = _release(path, preset, dit, vae)
    return base.name, _merge(base.vae, vae, RELEASE_VAE_FIELDS, file, base.name, passed=preset is not None)


def upstream_config(path: str | Path, preset: str | None = None) -> ModelConfig:
    """The architecture of an upstream model directory (see the module docstring)."""
    path = Path(path)
    if not (path / "transformer" / "config.json").exists():
        raise CheckpointError(f"{path} is neither an easyanimate-rt model directory (easyanimate_rt.json) "
                              f"nor an upstream one (transformer/config.json)")
    name, dit_cfg = dit_config(path, preset)
    _, vae_cfg = vae_config(path, name)
    base = from_preset(name)
    text: TextEncoderConfig = base.text_encoder
    t5 = _read(path / "text_encoder" / "config.json")
    if t5:
        text = dataclasses.replace(text, **{k: t5[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff",
                                                               "num_layers", "num_heads") if k in t5})
    try:
        return dataclasses.replace(base, name=f"{name}@{path.name}", dit=dit_cfg, vae=vae_cfg, text_encoder=text)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: the networks' configs do not fit together: {exc}") from None
