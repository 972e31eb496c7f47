"""ExportSpec: the contract of one exported graph (DESIGN.md 4).

One spec per exportable network (and per fixed-shape variant of a network): input and
output names, dtypes and shapes, the symbolic dimensions with their ranges and
multiples, min/opt/max per optimisation profile, the export sample, the opset and the
precision policy. It is serialised to ``spec.json`` next to ``model.onnx``; the
exporter, the engine builder, the runtime and the parity tests all read it.

Networks and graphs (names are the folder names under an export directory):

    text_encoder                 T5: input_ids, attention_mask (B, S) -> text_embeddings (B, S, E)
    dit                          one denoising step: latents (B, C, F, H, W), timestep (B,),
                                 text (B, S, E), text_mask (B, S) -> noise_pred (B, C', F, H, W);
                                 InP models also take inpaint_latents (B, 2C, F, H, W) and,
                                 with a CLIP projection, clip_embeds (B, K), clip_mask (B, T)
    vae_encoder/<variant>        one encoder slice: frames (B, 3, T, H, W) -> latents
                                 (B, 4, T', H/8, W/8); variants ``image`` (T = 1) and
                                 ``slice`` (T = slice_frames)
    vae_decoder/<variant>        one decoder slice with neighbour context: context
                                 (B, 4, Tc, h, w) -> frames (B, 3, F, 8h, 8w)

The decoder's GroupNorm and attention pool over the whole context, so each distinct
(Tc, start, length) of :meth:`VAEConfig.slice_plan` is its own graph. With n latents
per slice (2 for every preset) the variants are:

    interior  (3n, n, n)   previous + current + next slice (almost every slice)
    first     (2n, 0, n)   first slice of a video with more than one slice
    last      (2n, n, n)   last slice of a video with more than one slice
    single    (n, 0, n)    the only slice of a video
    lone      (1, 0, 1)    the lone first latent of an odd-length video (8k+1 frames)

A chunked (V2) VAE decodes every 3-latent chunk on its own: variants ``chunk`` (3, 0, 3)
and ``lone`` (1, 0, 1) for an image.

:func:`decoder_variant` maps a :class:`SliceSpec` to its variant name.

Shape entries are ints (static) or strings: a dimension name (``"height"``), or a
name with one integer factor (``"8*height"``, ``"height/8"``) for outputs whose size
follows an input's. Symbols: B batch, S text tokens, E text width, C latent channels,
F latent frames, H, W latent height and width (DiT, decoder) or pixel size (encoder).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import ConfigError, ExportError, ShapeError
from ..fileio import atomic_write_text
from ..reference.config import ModelConfig, SliceSpec
from .precision import PrecisionPolicy, policy_for

SPEC_NAME = "spec.json"
MODEL_NAME = "model.onnx"
INPUTS_NAME = "inputs.npz"
DEFAULT_OPSET = 19  # >= 19 for FP8 QuantizeLinear/DequantizeLinear; >= 18 asked by the issue
SPEC_FORMAT = 1

NETWORKS = ("text_encoder", "dit", "vae_encoder", "vae_decoder")
CACHE_NETWORK = "dit_cache"  # dit_cache/head + dit_cache/tail (step caching), exported only when asked for
ENCODER_VARIANTS = ("image", "slice")
#: which network's backend choice (``--backend dit=...,vae=...``) each exported network follows
CHOICE_OF = {"text_encoder": "text_encoder", "dit": "dit", "dit_cache": "dit", "vae_encoder": "vae",
             "vae_decoder": "vae"}
DECODER_VARIANTS = ("interior", "first", "last", "single", "lone")  # slice-mode VAEs
CHUNK_DECODER_VARIANTS = ("chunk", "lone")  # chunked (V2) VAEs

_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
              "bool": np.bool_}
_EXPR = re.compile(r"^(?:(\d+)\*)?([A-Za-z_][A-Za-z0-9_]*)(?:/(\d+))?$")


# --- pieces -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output.

    ``sampling`` says how :meth:`ExportSpec.random_inputs` fills it: ``normal`` (unit
    Gaussian), ``timestep`` (uniform in [0, 1000)), ``ids`` (token ids below ``high``),
    ``mask`` (1s followed by 0s, at least one 1 per row), ``uniform`` (in [-1, 1]).
    """

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    sampling: str = "normal"
    high: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "sampling": self.sampling, "high": self.high}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]), d.get("sampling", "normal"), d.get("high", 0))


@dataclass(frozen=True)
class DimSpec:
    """A symbolic dimension: ``min <= value <= max`` and ``value % multiple == 0``."""

    name: str
    min: int
    max: int
    multiple: int = 1
    doc: str = ""

    def __post_init__(self) -> None:
        if not (1 <= self.min <= self.max) or self.multiple < 1:
            raise ConfigError(f"dimension {self.name}: need 1 <= min <= max and multiple >= 1, "
                              f"got min={self.min} max={self.max} multiple={self.multiple}")
        if self.min % self.multiple or self.max % self.multiple:
            raise ConfigError(f"dimension {self.name}: min and max must be multiples of "
                              f"{self.multiple}, got {self.min}, {self.max}")

    def check(self, value: int) -> None:
        if not isinstance(value, (int, np.integer)) or not self.min <= value <= self.max \
                or value % self.multiple:
            mult = f" and a multiple of {self.multiple}" if self.multiple > 1 else ""
            raise ShapeError(f"{self.name} must be in [{self.min}, {self.max}]{mult}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Profile:
    """An optimisation profile: (min, opt, max) per dimension (TensorRT semantics)."""

    name: str
    dims: Mapping[str, tuple[int, int, int]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dims": {k: list(v) for k, v in self.dims.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Profile":
        return cls(d["name"], {k: tuple(v) for k, v in d["dims"].items()})


def eval_dim(entry: int | str, dims: Mapping[str, int]) -> int:
    """Value of a shape entry (``4``, ``"height"``, ``"8*height"``, ``"height/8"``)."""
    if isinstance(entry, int):
        return entry
    m = _EXPR.match(entry)
    if m is None:
        raise ExportError(f"bad shape entry {entry!r}")
    mul, name, div = m.groups()
    if name not in dims:
        raise ShapeError(f"no value for dimension {name!r}")
    value = dims[name] * int(mul or 1)
    if div:
        if value % int(div):
            raise ShapeError(f"{name}={dims[name]} is not divisible by {div}")
        value //= int(div)
    return value


# --- the spec -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportSpec:
    """Everything a consumer of one exported graph needs to know about it."""

    network: str
    variant: str
    model: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[DimSpec, ...]
    profiles: tuple[Profile, ...]
    sample: Mapping[str, int]
    precision: PrecisionPolicy
    opset: int = DEFAULT_OPSET
    static: Mapping[str, int] = field(default_factory=dict)
    graph: Mapping[str, Any] = field(default_factory=dict)  # filled in after export

    # -- identity ---------------------------------------------------------------------

    @property
    def key(self) -> str:
        """Folder of this graph under an export directory: ``dit`` or ``vae_decoder/first``."""
        return f"{self.network}/{self.variant}" if self.variant else self.network

    def dim(self, name: str) -> DimSpec:
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(name)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    # -- shapes -----------------------------------------------------------------------

    def check_dims(self, dims: Mapping[str, int]) -> None:
        """Raise ShapeError (naming the range) unless ``dims`` is inside every range."""
        for d in self.dims:
            if d.name not in dims:
                raise ShapeError(f"{self.key}: no value for dimension {d.name!r}")
            d.check(dims[d.name])

    def input_shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: tuple(eval_dim(e, dims) for e in t.shape) for t in self.inputs}

    def output_shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: tuple(eval_dim(e, dims) for e in t.shape) for t in self.outputs}

    def dims_of(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """Dimension values read off concrete input shapes (the inverse of input_shapes)."""
        out: dict[str, int] = {}
        for t in self.inputs:
            shape = tuple(shapes[t.name])
            if len(shape) != len(t.shape):
                raise ShapeError(f"{self.key}: input {t.name} must have rank {len(t.shape)}, "
                                 f"got shape {shape}")
            for entry, size in zip(t.shape, shape):
                if isinstance(entry, int):
                    if size != entry:
                        raise ShapeError(f"{self.key}: input {t.name} must have shape {list(t.shape)}, "
                                         f"got {shape}")
                    continue
                mul, name, div = _EXPR.match(entry).groups()  # type: ignore[union-attr]
                value = size * int(div or 1)
                if value % int(mul or 1):
                    raise ShapeError(f"{self.key}: {t.name} size {size} is not a multiple of {mul}")
                value //= int(mul or 1)
                if out.setdefault(name, value) != value:
                    raise ShapeError(f"{self.key}: inputs disagree on dimension {name}: "
                                     f"{out[name]} vs {value}")
        return out

    def profile_shapes(self, profile: Profile | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
        """{input: (min shape, opt shape, max shape)} for a TensorRT optimisation profile."""
        profile = profile or self.profiles[0]
        picks = [{k: v[i] for k, v in profile.dims.items()} for i in range(3)]
        return {t.name: tuple(tuple(eval_dim(e, p) for e in t.shape) for p in picks)
                for t in self.inputs}

    def opt_dims(self, profile: Profile | None = None) -> dict[str, int]:
        profile = profile or self.profiles[0]
        return {k: v[1] for k, v in profile.dims.items()}

    # -- inputs -----------------------------------------------------------------------

    def random_inputs(self, dims: Mapping[str, int] | None = None, seed: int = 0
                      ) -> dict[str, np.ndarray]:
        """Fresh random inputs at ``dims`` (default: the export sample), as numpy arrays."""
        dims = dict(self.sample if dims is None else dims)
        self.check_dims(dims)
        rng = np.random.default_rng(seed)
        feeds: dict[str, np.ndarray] = {}
        for t, shape in zip(self.inputs, self.input_shapes(dims).values()):
            np_dtype = _NP_DTYPES[t.dtype]
            if t.sampling == "ids":
                value = rng.integers(0, max(t.high, 1), size=shape)
            elif t.sampling == "mask":
                lengths = rng.integers(1, shape[-1] + 1, size=shape[:-1])
                value = np.arange(shape[-1]) < lengths[..., None]
            elif t.sampling == "timestep":
                value = rng.uniform(0, 1000, size=shape)
            elif t.sampling == "uniform":
                value = rng.uniform(-1, 1, size=shape)
            else:
                value = rng.standard_normal(size=shape)
            feeds[t.name] = np.ascontiguousarray(value.astype(np_dtype))
        return feeds

    def sample_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        return self.random_inputs(self.sample, seed)

    # -- serialisation ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT, "network": self.network, "variant": self.variant,
            "model": self.model, "opset": self.opset,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dims": [d.to_dict() for d in self.dims],
            "profiles": [p.to_dict() for p in self.profiles],
            "sample": dict(self.sample), "static": dict(self.static),
            "precision": self.precision.to_dict(), "graph": dict(self.graph),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ExportSpec":
        if d.get("format") != SPEC_FORMAT:
            raise ExportError(f"unsupported spec format {d.get('format')!r} (this version reads {SPEC_FORMAT})")
        return cls(
            network=d["network"], variant=d["variant"], model=d["model"], opset=d["opset"],
            inputs=tuple(TensorSpec.from_dict(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_dict(t) for t in d["outputs"]),
            dims=tuple(DimSpec(**x) for x in d["dims"]),
            profiles=tuple(Profile.from_dict(p) for p in d["profiles"]),
            sample=dict(d["sample"]), static=dict(d.get("static", {})),
            precision=PrecisionPolicy.from_dict(d["precision"]), graph=dict(d.get("graph", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SPEC_NAME
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ExportSpec":
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ExportError(f"no {SPEC_NAME} at {path}") from None
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ExportError(f"{path} is not readable JSON ({exc}); it is corrupt or truncated, export again "
                              f"with `easyanimate-rt export`") from None
        if not isinstance(data, dict):
            raise ExportError(f"{path} holds a JSON {type(data).__name__}, not a graph spec; export again")
        try:
            return cls.from_dict(data)
        except ExportError as exc:
            raise ExportError(f"{path}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ExportError(f"{path} is not a valid graph spec ({type(exc).__name__}: {exc}); export again "
                              f"with `easyanimate-rt export`") from None

    def replace(self, **changes: Any) -> "ExportSpec":
        return dataclasses.replace(self, **changes)


# --- builders -----------------------------------------------------------------------------


#: Prompts one batched generation call takes (runtime: a list of prompts runs in batches of
#: at most this many): the text encoder's and the DiT's batch go up to twice this.
MAX_PROMPTS = 4


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(value / multiple)) * multiple)


def _dim(name: str, lo: int, opt: int, hi: int, multiple: int = 1, doc: str = ""
         ) -> tuple[DimSpec, tuple[int, int, int]]:
    lo, hi = _round_up(lo, multiple), _round_up(hi, multiple)
    opt = min(max(_round_up(opt, multiple), lo), hi)
    return DimSpec(name, lo, hi, multiple, doc), (lo, opt, hi)


def _assemble(network: str, variant: str, config: ModelConfig, precision: str,
              inputs, outputs, dim_table, sample: dict[str, int], static=None) -> ExportSpec:
    dims = tuple(d for d, _ in dim_table)
    profile = Profile("default", {d.name: r for d, r in dim_table})
    spec = ExportSpec(network=network, variant=variant, model=config.name, inputs=tuple(inputs),
                      outputs=tuple(outputs), dims=dims, profiles=(profile,), sample=sample,
                      precision=policy_for(network, precision), static=dict(static or {}))
    spec.check_dims(sample)
    return spec


def text_encoder_spec(config: ModelConfig, precision: str = "fp32", max_batch: int = 2 * MAX_PROMPTS) -> ExportSpec:
    """T5: batch dynamic (1 .. ``max_batch``: a negative and a positive prompt for each of
    up to MAX_PROMPTS prompts; opt 2), length fixed."""
    t = config.text_encoder
    s = t.max_length
    return _assemble(
        "text_encoder", "", config, precision,
        [TensorSpec("input_ids", "int64", ("batch", s), "ids", t.vocab_size),
         TensorSpec("attention_mask", "int64", ("batch", s), "mask")],
        [TensorSpec("text_embeddings", "float32", ("batch", s, t.d_model))],
        [_dim("batch", 1, 2, max(max_batch, 2), doc="prompts")],
        sample={"batch": 2})


def dit_spec(config: ModelConfig, precision: str = "fp32", *, max_frames: int | None = None,
             max_size: int | None = None) -> ExportSpec:
    """One denoising step. Latent height and width are multiples of patch x grid-reshape
    block, at least two of them (a 1 x 1 token grid leaves the motion module's
    GroupNorm a single value per group); opt is the model's default size, max covers
    both orientations of it."""
    d, v, sd = config.dit, config.vae, config.sampling
    mult = d.latent_multiple
    s, e = config.text_encoder.max_length, d.caption_channels
    sc = v.spatial_compression
    opt_f = v.latent_frames(sd.frames)
    opt_h, opt_w = sd.height // sc, sd.width // sc
    hi = max_size or max(opt_h, opt_w, 4 * mult)
    inputs = [TensorSpec("latents", "float32", ("batch", d.in_channels, "frames", "height", "width")),
              TensorSpec("timestep", "float32", ("batch",), "timestep"),
              TensorSpec("text", "float32", ("batch", s, e)),
              TensorSpec("text_mask", "int64", ("batch", s), "mask")]
    if d.inpaint:
        inputs.append(TensorSpec("inpaint_latents", "float32", ("batch", d.inpaint_channels, "frames", "height", "width")))
    if d.clip_channels:
        inputs += [TensorSpec("clip_embeds", "float32", ("batch", d.clip_channels)),
                   TensorSpec("clip_mask", "int64", ("batch", d.clip_tokens), "mask")]
    assert tuple(t.name for t in inputs) == dit_input_names(config)
    return _assemble(
        "dit", "", config, precision, inputs,
        [TensorSpec("noise_pred", "float32", ("batch", d.out_channels, "frames", "height", "width"))],
        [_dim("batch", 1, 2, 2 * MAX_PROMPTS, doc="prompts x (2 for batched classifier-free guidance, else 1)"),
         _dim("frames", 1, opt_f, max(max_frames or opt_f, opt_f), doc="latent frames"),
         _dim("height", 2 * mult, opt_h, hi, mult, doc="latent height"),
         _dim("width", 2 * mult, opt_w, hi, mult, doc="latent width")],
        sample={"batch": 2, "frames": 2, "height": 2 * mult, "width": 3 * mult})


def dit_cache_specs(config: ModelConfig, precision: str = "fp32") -> list[ExportSpec]:
    """The DiT split for step caching (runtime/step_cache.py), beside the whole-DiT graph:

    ``dit_cache/head``: the DiT's inputs + ``cached_residual`` -> the first block's output
    ``x1``, its residual ``first_residual`` (FBCache's signal), its timestep-modulated
    input ``modulated`` (TeaCache's), ``skip_pred`` = the final layer on ``x1 +
    cached_residual`` (a skipped step's prediction), and the context the tail reads.
    ``dit_cache/tail``: that context -> ``noise_pred`` (the whole DiT's output) and
    ``tail_residual`` (last block's output - ``x1``), the residual a skip reuses.
    Token tensors are laid out (B, F, H/P, W/P, D)."""
    whole = dit_spec(config, precision)
    d = config.dit
    p, dd = d.patch_size, d.hidden_size
    s_all = config.text_encoder.max_length + (d.clip_tokens if d.clip_channels else 0)
    grid = ("batch", "frames", f"height/{p}", f"width/{p}", dd)
    context = [TensorSpec("t6", "float32", ("batch", 6 * dd)), TensorSpec("t_emb", "float32", ("batch", dd)),
               TensorSpec("text_proj", "float32", ("batch", s_all, dd)),
               TensorSpec("text_bias", "float32", ("batch", 1, 1, s_all))]
    x1 = TensorSpec("x1", "float32", grid)
    pred = whole.outputs[0]
    dims = [(dim, whole.profiles[0].dims[dim.name]) for dim in whole.dims]
    head = _assemble(CACHE_NETWORK, "head", config, precision, list(whole.inputs) + [TensorSpec("cached_residual", "float32",
                                                                                       grid)],
                     [x1, TensorSpec("first_residual", "float32", grid), TensorSpec("modulated", "float32", grid),
                      TensorSpec("skip_pred", "float32", pred.shape)] + context, dims, sample=dict(whole.sample))
    tail = _assemble(CACHE_NETWORK, "tail", config, precision, [x1] + context,
                     [pred, TensorSpec("tail_residual", "float32", grid)], dims, sample=dict(whole.sample))
    return [head, tail]


def dit_input_names(config: ModelConfig) -> tuple[str, ...]:
    """The DiT graph's inputs, in ``VideoDiT.forward``'s order: the InP ones only when the
    model has them."""
    d = config.dit
    return (("latents", "timestep", "text", "text_mask") + (("inpaint_latents",) if d.inpaint else ())
            + (("clip_embeds", "clip_mask") if d.clip_channels else ()))


def vae_encoder_spec(config: ModelConfig, variant: str, precision: str = "fp32",
                     max_size: int | None = None) -> ExportSpec:
    """One encoder slice: ``image`` (1 frame) or ``slice`` (slice_frames frames)."""
    if variant not in ENCODER_VARIANTS:
        raise ConfigError(f"vae_encoder variant must be one of {list(ENCODER_VARIANTS)}, got {variant!r}")
    v, sd = config.vae, config.sampling
    sc = v.spatial_compression
    frames = 1 if variant == "image" else v.slice_frames
    t_out = 1 if frames == 1 else v.latents_per_slice
    hi = max_size or max(sd.height, sd.width)
    return _assemble(
        "vae_encoder", variant, config, precision,
        [TensorSpec("frames", "float32", ("batch", v.in_channels, frames, "height", "width"), "uniform")],
        [TensorSpec("latents", "float32", ("batch", v.latent_channels, t_out, f"height/{sc}", f"width/{sc}"))],
        [_dim("batch", 1, 1, 2),
         _dim("height", sc, sd.height, hi, sc, doc="pixel height"),
         _dim("width", sc, sd.width, hi, sc, doc="pixel width")],
        sample={"batch": 2, "height": 4 * sc, "width": 5 * sc}, static={"frames": frames})


def decoder_variants(config: ModelConfig) -> dict[str, tuple[int, int, int]]:
    """Variant name -> (context latent frames, start, length), read off the VAE config's
    own slice plans (see the module docstring). Slice mode: the lone first latent of an
    odd video, the only slice of a one-slice video, and the first, interior and last
    slices of a three-slice video cover every entry any plan can have. Chunk mode (V2):
    every chunk is its own context, so ``chunk`` and the ``lone`` latent of an image."""
    vae = config.vae
    n = vae.latents_per_slice

    def key(s: SliceSpec) -> tuple[int, int, int]:
        return (s.ctx_end - s.ctx_start, s.start, s.length)

    if vae.slicing == "chunk":
        return {"chunk": key(vae.slice_plan(n)[0]), "lone": key(vae.slice_plan(1)[0])}
    first, interior, last = (key(s) for s in vae.slice_plan(3 * n))
    table = {"interior": interior, "first": first, "last": last, "single": key(vae.slice_plan(n)[0])}
    if n > 1:
        table["lone"] = key(vae.slice_plan(n + 1)[0])
    return table


def decoder_variant(config: ModelConfig, slice_spec: SliceSpec) -> str:
    """The decoder graph that decodes ``slice_spec`` (an entry of ``SliceVAE.slice_plan``)."""
    key = (slice_spec.ctx_end - slice_spec.ctx_start, slice_spec.start, slice_spec.length)
    for name, value in decoder_variants(config).items():
        if value == key:
            return name
    raise ShapeError(f"no decoder variant for context/start/length {key}")


def vae_decoder_spec(config: ModelConfig, variant: str, precision: str = "fp32",
                     max_size: int | None = None) -> ExportSpec:
    table = decoder_variants(config)
    if variant not in table:
        raise ConfigError(f"vae_decoder variant must be one of {list(table)}, got {variant!r}")
    ctx, start, length = table[variant]
    v, sd = config.vae, config.sampling
    sc = v.spatial_compression
    frames = v.decoded_frames(length)
    opt_h, opt_w = sd.height // sc, sd.width // sc
    hi = max_size or max(opt_h, opt_w)
    return _assemble(
        "vae_decoder", variant, config, precision,
        [TensorSpec("context", "float32", ("batch", v.latent_channels, ctx, "height", "width"))],
        [TensorSpec("frames", "float32", ("batch", v.out_channels, frames, f"{sc}*height", f"{sc}*width"))],
        [_dim("batch", 1, 1, 2),
         _dim("height", 1, opt_h, hi, doc="latent height"),
         _dim("width", 1, opt_w, hi, doc="latent width")],
        sample={"batch": 2, "height": 3, "width": 4},
        static={"context_frames": ctx, "start": start, "length": length})


def make_specs(config: ModelConfig, precision: str = "fp32", networks=None) -> list[ExportSpec]:
    """Specs of every graph of ``networks`` (default: all four networks, all variants;
    ``dit_cache`` adds the step-caching split of the DiT, :func:`dit_cache_specs`)."""
    networks = list(networks or NETWORKS)
    for n in networks:
        if n not in NETWORKS + (CACHE_NETWORK,):
            raise ConfigError(f"unknown network {n!r}; networks are {list(NETWORKS)} (and {CACHE_NETWORK!r})")
    specs: list[ExportSpec] = []
    for n in NETWORKS + (CACHE_NETWORK,):
        if n not in networks:
            continue
        if n == "text_encoder":
            specs.append(text_encoder_spec(config, precision))
        elif n == "dit":
            specs.append(dit_spec(config, precision))
        elif n == CACHE_NETWORK:
            specs += dit_cache_specs(config, precision)
        elif n == "vae_encoder":
            specs += [vae_encoder_spec(config, v, precision) for v in ENCODER_VARIANTS]
        else:
            specs += [vae_decoder_spec(config, v, precision) for v in decoder_variants(config)]
    return specs


def spec_of(config: ModelConfig, key: str, precision: str = "fp32") -> ExportSpec:
    """The spec of one graph by its key (``dit``, ``vae_decoder/first``, ``dit_cache/head``)."""
    network = key.split("/")[0]
    if network not in NETWORKS + (CACHE_NETWORK,):
        raise ConfigError(f"unknown graph {key!r}; networks are {list(NETWORKS)} (and {CACHE_NETWORK!r})")
    for spec in make_specs(config, precision, [network]):
        if spec.key == key:
            return spec
    raise ConfigError(f"{config.name} has no graph {key!r}")


@dataclass(frozen=True, order=True)
class GraphKey:
    """One exported graph as a value: its network and variant ("" for none). Its string,
    ``vae_decoder/first`` or ``dit``, names its folder and its manifest entry."""

    network: str
    variant: str = ""

    @classmethod
    def parse(cls, key: "str | GraphKey") -> "GraphKey":
        if isinstance(key, GraphKey):
            return key
        network, _, variant = str(key).partition("/")
        if network not in CHOICE_OF:
            raise ConfigError(f"unknown graph {key!r}; networks are {sorted(CHOICE_OF)}")
        return cls(network, variant)

    @property
    def choice(self) -> str:
        """The network whose backend this graph runs on: text_encoder, dit or vae."""
        return CHOICE_OF[self.network]

    def __str__(self) -> str:
        return f"{self.network}/{self.variant}" if self.variant else self.network


def encoder_key(frames: int) -> GraphKey:
    """The VAE encoder graph of one slice of ``frames`` frames: a lone frame is encoded as
    an image, the rest as 8-frame slices (DESIGN.md 1.2)."""
    return GraphKey("vae_encoder", "image" if frames == 1 else "slice")
