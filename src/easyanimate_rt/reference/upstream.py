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
  ``--preset`` and says why;
- a config that carries motion-module keys is read as upstream reads them: a kwargs dict
  goes to upstream's VanillaTemporalModule whole, so a key it leaves out takes that
  class's default (``_MOTION_DEFAULTS``), and each argument is honoured
  (``_MOTION_MAPPED``), refused (``_MOTION_FIXED``) or does not change the output
  (``_MOTION_NO_EFFECT``). A config that states the whole motion module
  (``motion_stated``: as one saved from a built upstream model does) is that module even
  where no release has it (other odd-block heads, no global attention...): the preset
  supplies none of it, so its motion-module fields are not matched against the preset.
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
#: the motion-module ones: not matched where the config states its whole motion module
#: (motion_stated), since then the preset supplies none of it
MOTION_RELEASE_FIELDS = ("hybrid_global_attention", "temporal_num_heads", "temporal_block_size")
#: upstream's AutoencoderKLMagvit default scaling_factor, what from_pretrained gives a
#: vae/config.json without the key: autoencoder_magvit.py:75 (V2 fb0916f) and :80 (V3
#: f9eeabe), both 0.1825, not SD's 0.18215 (tests/fixtures/upstream/round2/vae-default-scale).
#: V3's pipelines read vae.config.scaling_factor everywhere (pipeline_easyanimate.py:581,
#: pipeline_easyanimate_inpaint.py:549/618/657/701/734 at f9eeabe), so a V3 directory without
#: the key runs 0.1825. V2's text-to-video pipeline decodes with a literal 0.18215 whatever
#: the config says (pipeline_easyanimate.py:581 at fb0916f), which is the V2 presets' value,
#: so a V2 directory keeps the preset's.
UPSTREAM_VAE_SCALING_FACTOR = 0.1825
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
                         ("basic_block_type", ("motionmodule", "global_motionmodule")),
                         # each of these changes the blocks (diffusers BasicTransformerBlock rules)
                         ("num_vector_embeds", (None,)), ("only_cross_attention", (False,)),
                         ("double_self_attention", (False,)), ("upcast_attention", (False,)),
                         ("attention_type", ("default",))):
        _require(file, raw, key, allowed)
    hidden = raw.get("num_attention_heads", 16) * raw.get("attention_head_dim", 88)
    if raw.get("cross_attention_dim") is not None and raw["cross_attention_dim"] != hidden:
        # the caption projection gives the hidden width, which attn2 takes as its context
        raise CheckpointError(f"{file}: cross_attention_dim={raw['cross_attention_dim']!r} is not supported (the "
                              f"hidden size, {hidden})")
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
    out.update(_motion_fields(file, raw))
    return out


#: upstream's VanillaTemporalModule arguments and defaults (motion_module.py:50-68 at
#: f9eeabe; V2 fb0916f:265 has a subset). A motion_module_kwargs dict is passed to it whole
#: (motion_module.py:43-45), so a key a stated dict leaves out takes this default, and a
#: key it does not know is upstream's TypeError.
_MOTION_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 8, "num_transformer_block": 2, "attention_block_types": ["Temporal_Self", "Temporal_Self"],
    "cross_frame_attention_mode": None, "temporal_position_encoding": False,
    "temporal_position_encoding_max_len": 4096, "temporal_attention_dim_div": 1, "zero_initialize": True,
    "block_size": 1, "grid": False, "remove_time_embedding_in_photo": False, "global_num_attention_heads": 16,
    "global_attention": False, "qk_norm": False}
#: motion-module settings this DiT runs only at these values: any other changes the
#: output (another depth, a qk LayerNorm, a GlobalTransformer3DModel after the temporal
#: one...), so it is refused rather than loaded silently
_MOTION_FIXED = {"num_transformer_block": (1,), "cross_frame_attention_mode": (None,),
                 "temporal_attention_dim_div": (1,), "qk_norm": (False,), "global_attention": (False,)}
#: motion-module settings read and honoured (-> the DiTConfig field)
_MOTION_MAPPED = {"num_attention_heads": "temporal_num_heads / temporal_num_heads_odd",
                  "attention_block_types": "hybrid_global_attention",
                  "block_size": "temporal_block_size (with grid)", "grid": "temporal_block_size",
                  "temporal_position_encoding": "temporal_position_encoding",
                  "temporal_position_encoding_max_len": "temporal_max_positions",
                  "remove_time_embedding_in_photo": "remove_time_embedding_in_photo"}
#: motion-module settings that do not change the output of a loaded checkpoint
_MOTION_NO_EFFECT = {
    "zero_initialize": "initialisation only: the checkpoint's weights replace it",
    "global_num_attention_heads": "used only by the GlobalTransformer3DModel of global_attention, which is refused",
}
assert set(_MOTION_DEFAULTS) == set(_MOTION_FIXED) | set(_MOTION_MAPPED) | set(_MOTION_NO_EFFECT)


def _motion_parity(file: Path, name: str, kwargs: Mapping[str, Any], grid_type: bool | None) -> dict[str, Any]:
    """One stated kwargs dict (one parity's motion modules), with upstream's defaults."""
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(f"{file}: {name} must be a JSON object, got {kwargs!r}")
    unknown = sorted(set(kwargs) - set(_MOTION_DEFAULTS))
    if unknown:
        raise CheckpointError(f"{file}: {name} has {unknown}, which upstream's motion module does not take "
                              f"(known: {sorted(_MOTION_DEFAULTS)})")
    k = {**_MOTION_DEFAULTS, **kwargs}
    for key, allowed in _MOTION_FIXED.items():
        if k[key] not in allowed:
            unstated = "" if key in kwargs else " (upstream's default where the dict leaves it out)"
            raise CheckpointError(f"{file}: {name}.{key}={k[key]!r}{unstated} is not supported (this DiT runs "
                                  f"{key}={allowed[0]!r})")
    types = list(k["attention_block_types"]) if isinstance(k["attention_block_types"], (list, tuple)) else None
    # VersatileAttention's mode is the name's prefix (motion_module.py:276): Temporal attends
    # over frames, Global over all clip tokens; "_Cross" would attend to text
    if types is None or len(types) != 2 or types[0] != "Temporal_Self" or \
            types[1] not in ("Temporal_Self", "Global_Self"):
        raise CheckpointError(f"{file}: {name}.attention_block_types={k['attention_block_types']!r} is not "
                              f"supported (['Temporal_Self', 'Temporal_Self'] or ['Temporal_Self', 'Global_Self'])")
    if grid_type and "grid" in kwargs:  # get_motion_module passes grid=True itself (motion_module.py:45)
        raise CheckpointError(f"{file}: {name}.grid is not supported with motion_module_type 'VanillaGrid' "
                              f"(upstream passes grid twice)")
    grid = bool(grid_type) or bool(k["grid"])
    return {"heads": k["num_attention_heads"], "global": types[1] == "Global_Self",
            # block_size acts only with grid (motion_module.py:403-410); grid_type None: the
            # file does not say whether it is grid, so the preset says the block size
            "block": (k["block_size"] if grid else 1) if grid_type is not None or k["grid"] else None,
            "tpe": bool(k["temporal_position_encoding"]), "max_len": k["temporal_position_encoding_max_len"],
            "photo": bool(k["remove_time_embedding_in_photo"])}


def _motion_keys(raw: Mapping[str, Any]) -> tuple[bool, tuple[str, ...]]:
    """(hybrid even/odd blocks?, the kwargs keys upstream reads): global_motionmodule builds
    block d from motion_module_kwargs_even if d % 2 == 0 else _odd (transformer3d.py:306 at
    f9eeabe), motionmodule every block from motion_module_kwargs (transformer3d.py:279)."""
    basic = raw.get("basic_block_type")
    parity = basic == "global_motionmodule" or (basic is None and ("motion_module_kwargs_even" in raw
                                                                  or "motion_module_kwargs_odd" in raw))
    return parity, (("motion_module_kwargs_even", "motion_module_kwargs_odd") if parity else ("motion_module_kwargs",))


def motion_stated(raw: Mapping[str, Any]) -> bool:
    """Whether a config states its whole motion module (block type, module type and every
    kwargs dict upstream reads), as a config saved from a built upstream model does: then
    the preset supplies none of it."""
    _, keys = _motion_keys(raw)
    return all(raw.get(k) is not None for k in ("basic_block_type", "motion_module_type", *keys))


def _motion_fields(file: Path, raw: Mapping[str, Any]) -> dict[str, Any]:
    """DiTConfig motion-module fields from what a config states: every upstream argument
    honoured or refused (module docstring); what it does not state, the preset gives."""
    out: dict[str, Any] = {}
    parity, keys = _motion_keys(raw)
    mtype = raw.get("motion_module_type")
    grid_type = None if mtype is None else mtype == "VanillaGrid"
    if raw.get("basic_block_type") == "motionmodule":
        stray = [k for k in ("motion_module_kwargs_even", "motion_module_kwargs_odd") if raw.get(k) is not None]
        if stray and raw.get("motion_module_kwargs") is None:
            raise CheckpointError(f"{file}: basic_block_type='motionmodule' builds every block from "
                                  f"motion_module_kwargs, which the file does not state (it states {stray})")
    stated = [(k, _motion_parity(file, k, raw[k], grid_type)) for k in keys if raw.get(k) is not None]
    if not stated:
        if parity and raw.get("basic_block_type") == "global_motionmodule":
            out["hybrid_global_attention"] = True  # the V3 yaml's odd blocks (the preset's module)
        elif "basic_block_type" in raw:
            out["hybrid_global_attention"] = False
        if mtype is not None:
            out["temporal_block_size"] = 2 if grid_type else 1
        return out
    (first, even), odd = stated[0], (stated[1][1] if len(stated) > 1 else None)
    if not parity:
        odd = even  # one dict for every block
    elif first != keys[0]:  # only the odd blocks' dict: the even blocks' is the preset's
        raise CheckpointError(f"{file}: motion_module_kwargs_odd without motion_module_kwargs_even is not "
                              f"supported (state both)")
    if even["global"]:
        raise CheckpointError(f"{file}: {first}.attention_block_types={['Temporal_Self', 'Global_Self']!r} puts "
                              f"global attention in {'every' if not parity else 'the even'} block; this DiT has "
                              f"it in the odd blocks only")
    out["temporal_num_heads"] = even["heads"]
    out["temporal_position_encoding"] = even["tpe"]
    out["remove_time_embedding_in_photo"] = even["tpe"] and even["photo"]
    out["temporal_max_positions"] = even["max_len"]
    if even["block"] is not None:
        out["temporal_block_size"] = even["block"]
    if odd is None:  # the odd blocks' dict is not stated: the preset's (V3 yaml: hybrid)
        out["hybrid_global_attention"] = raw.get("basic_block_type", "global_motionmodule") == "global_motionmodule"
        return out
    out["hybrid_global_attention"] = odd["global"]
    out["temporal_num_heads_odd"] = None if odd["heads"] == even["heads"] else odd["heads"]
    for key, what in (("block", "block_size"), ("tpe", "temporal_position_encoding"),
                      ("photo", "remove_time_embedding_in_photo"), ("max_len", "temporal_position_encoding_max_len")):
        if key in ("photo", "max_len") and not even["tpe"]:
            continue  # no position table: these do nothing (motion_module.py:379-383)
        if odd[key] != even[key]:
            raise CheckpointError(f"{file}: motion_module_kwargs_odd.{what}={odd[key]!r} differs from the even "
                                  f"blocks' {even[key]!r}; per-parity motion-module {what} is not supported")
    return out


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
    raw = _read(file)
    dit = dit_fields(file, raw)
    vae_file = path / "vae" / "config.json"
    vae = vae_fields(vae_file, _read(vae_file))
    base = _release(path, preset, dit, vae)
    release = tuple(f for f in RELEASE_DIT_FIELDS if not (motion_stated(raw) and f in MOTION_RELEASE_FIELDS))
    merged = _merge(base.dit, dit, release, file, base.name, passed=preset is not None)
    return base.name, dataclasses.replace(merged, **scheduler_fields(path))


def vae_config(path: str | Path, preset: str | None = None) -> tuple[str, VAEConfig]:
    """(preset, VAEConfig) of an upstream directory's ``vae/`` alone."""
    path = Path(path)
    file = path / "vae" / "config.json"
    raw = _read(file)
    vae = vae_fields(file, raw)
    dit_file = path / "transformer" / "config.json"
    dit = dit_fields(dit_file, _read(dit_file))
    base = _release(path, preset, dit, vae)
    if raw and "scaling_factor" not in raw and base.name.startswith("v3"):
        vae["scaling_factor"] = UPSTREAM_VAE_SCALING_FACTOR  # V3 reads its config's (see the constant)
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
