"""LoRA adapters: read the upstream/kohya and diffusers/PEFT formats, merge into the
DiT and T5 from a kept base copy, write the kohya format (issue 27).

A LoRA changes a weight W (out, in) of a Linear or 1x1 convolution by a rank-r product:

    W' = W + weight * scale * up @ down        up (out, r), down (r, in), scale = alpha / r

(Hu et al. 2021, eq. 3; ``weight`` is upstream's ``multiplier``, 0.55 in its predict
scripts). Upstream merges in place and un-merges by subtracting, which drifts in low
precision; here W' is always recomputed from a kept copy of the base weight, in float32,
and unmerging copies the base back bit for bit.

File formats (safetensors only):

- kohya / upstream EasyAnimate: ``lora_unet_<path with '.' -> '_'>.lora_down.weight``,
  ``.lora_up.weight`` and an optional scalar ``.alpha`` (absent: scale 1); ``lora_te_``
  for the T5 encoder. Upstream names DiT layers from the transformer's own (empty) name,
  so its files say ``lora_unet__transformer_blocks_0_...`` (two underscores); one or two
  are accepted, two are written.
- diffusers / PEFT: ``transformer.<path>.lora_A.weight`` (down) and ``.lora_B.weight``
  (up), ``text_encoder.`` for T5. Alpha comes from a ``<path>.alpha`` tensor, else from
  the ``lora_adapter_metadata`` JSON that diffusers writes into the safetensors header
  (``transformer.lora_alpha``, ``.alpha_pattern``, ``.use_rslora``), else alpha = r.

Letters in shape comments: O output features, I input features, R rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from ..fileio import atomic_save_safetensors

log = logging.getLogger(__name__)

#: Networks a LoRA may change, by the prefix each format gives them.
KOHYA_PREFIXES = {"lora_unet_": "dit", "lora_te_": "text_encoder"}
PEFT_PREFIXES = {"transformer.": "dit", "text_encoder.": "text_encoder"}
EXPECTED_PREFIXES = ", ".join([*KOHYA_PREFIXES, *PEFT_PREFIXES])
#: Upstream's predict scripts merge their LoRA at this multiplier (predict_t2v.py:53).
UPSTREAM_DEFAULT_WEIGHT = 0.55
MOTION_MODULE = "attn_temporal"
_PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


# --- the adapter as the user names it ------------------------------------------------------

@dataclass(frozen=True)
class Adapter:
    """One LoRA file and the weight it is merged with; ``sha256`` of the file's bytes
    identifies it (engine cache keys, duplicate detection)."""

    path: Path
    weight: float
    sha256: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        check_weight(self.weight, str(self.path))
        object.__setattr__(self, "weight", float(self.weight))
        if not re.fullmatch(r"[0-9a-f]{64}", str(self.sha256)):
            raise InputError(f"LoRA sha256 must be 64 lowercase hex digits, got {self.sha256!r}")

    @classmethod
    def open(cls, path: str | Path, weight: float = 1.0) -> "Adapter":
        """Check the file (exists, is safetensors, finite tensors) and hash it."""
        check_weight(weight, str(path))
        data = _read_bytes(Path(path))
        _parse_safetensors(data, Path(path))
        return cls(Path(path), float(weight), hashlib.sha256(data).hexdigest())

    @classmethod
    def parse(cls, spec: str) -> "Adapter":
        """``PATH[:WEIGHT]`` (the CLI's ``--lora``); weight 1.0 when absent. A path that
        contains ':' and names an existing file is taken whole."""
        if Path(spec).is_file() or ":" not in spec:
            return cls.open(spec)
        path, _, text = spec.rpartition(":")
        try:
            weight = float(text)
        except ValueError:
            if not Path(path).is_file():
                raise InputError(f"LoRA file not found: {spec}") from None
            raise InputError(f"LoRA weight must be a number (PATH[:WEIGHT]), got {text!r} in {spec!r}") from None
        return cls.open(path, weight)

    def with_weight(self, weight: float) -> "Adapter":
        return Adapter(self.path, weight, self.sha256)

    def __str__(self) -> str:
        return f"{self.path}:{self.weight:g}"


def check_weight(weight: object, what: str) -> None:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise InputError(f"LoRA weight must be a number, got {weight!r} for {what}")
    if not math.isfinite(weight):
        raise InputError(f"LoRA weight must be finite, got {weight!r} for {what}")


def check_unique(adapters: Sequence[Adapter]) -> None:
    """The same file (by content) twice in one list would silently double its effect."""
    seen: dict[str, Adapter] = {}
    for a in adapters:
        if not isinstance(a, Adapter):
            raise InputError(f"expected an Adapter (Adapter.parse('PATH[:WEIGHT]')), got {a!r}")
        if a.sha256 in seen:
            raise InputError(f"the same LoRA may be given only once, got {seen[a.sha256].path} and {a.path} "
                             f"(sha256 {a.sha256[:12]}); give one entry with the summed weight")
        seen[a.sha256] = a


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise InputError(f"LoRA file not found: {path}")
    return path.read_bytes()


def _parse_safetensors(data: bytes, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file held in ``data``."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except Exception as exc:  # safetensors raises its own types for truncated or foreign bytes
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"LoRA file must be a complete safetensors file, {path} is not ({detail}); "
                              f"truncated or another format?") from None
    if not tensors:
        raise CheckpointError(f"LoRA file must hold tensors, {path} has none")
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"LoRA tensors must be finite, {path}: {key} has {bad} NaN/inf "
                                  f"value(s) of {t.numel()}")
    return tensors, metadata


# --- reading the two formats ---------------------------------------------------------------

@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update as a file states it (not yet resolved to a module)."""

    network: str                 # "dit" or "text_encoder"
    name: str                    # dotted module path (PEFT) or '_'-joined (kohya)
    kohya: bool
    down: torch.Tensor           # (R, I) or (R, I, 1, 1)
    up: torch.Tensor             # (O, R) or (O, R, 1, 1)
    scale: float                 # alpha / R (alpha / sqrt(R) for rsLoRA)
    keys: tuple[str, ...]        # the file keys this layer came from
    down_key: str
    up_key: str

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LoraFile:
    adapter: Adapter
    format: str                  # "kohya", "peft" or "kohya+peft"
    layers: tuple[LoraLayer, ...]
    unknown: tuple[str, ...]     # keys that are no LoRA tensor of a known network
    total: int                   # number of keys in the file


def read_lora(adapter: Adapter) -> LoraFile:
    """Parse an adapter's file into layers; the bytes must still hash to ``adapter.sha256``."""
    data = _read_bytes(adapter.path)
    if hashlib.sha256(data).hexdigest() != adapter.sha256:
        raise CheckpointError(f"LoRA file changed since it was named: {adapter.path} no longer has "
                              f"sha256 {adapter.sha256[:12]}")
    tensors, metadata = _parse_safetensors(data, adapter.path)
    groups: dict[tuple[str, str, bool], dict[str, tuple[str, torch.Tensor]]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        slot = _classify(key)
        if slot is None:
            unknown.append(key)
            continue
        network, name, kohya, part = slot
        groups.setdefault((network, name, kohya), {})[part] = (key, t)

    peft_meta = _peft_metadata(metadata)
    layers = []
    for (network, name, kohya), parts in groups.items():
        keys = tuple(k for k, _ in parts.values())
        if "down" not in parts or "up" not in parts:
            if set(parts) == {"alpha"}:  # an alpha with no weights: nothing to merge
                unknown.extend(keys)
                continue
            missing = "up" if "down" in parts else "down"
            raise CheckpointError(f"LoRA layers need both down and up weights, {adapter.path}: {name} has "
                                  f"{', '.join(keys)} but no {missing} weight")
        down, up = parts["down"][1], parts["up"][1]
        rank = down.shape[0]
        alpha = float(parts["alpha"][1].float().reshape(-1)[0]) if "alpha" in parts else None
        if kohya:
            # Upstream: no alpha -> scale 1 (lora_utils.py:410-413); alpha 0 means alpha = rank
            # when it trains (lora_utils.py:62).
            scale = 1.0 if not alpha else alpha / rank
        else:
            scale = _peft_scale(network, name, rank, alpha, peft_meta)
        layers.append(LoraLayer(network, name, kohya, down, up, scale, keys, parts["down"][0], parts["up"][0]))

    kinds = {l.kohya for l in layers}
    fmt = {frozenset({True}): "kohya", frozenset({False}): "peft"}.get(frozenset(kinds), "kohya+peft")
    return LoraFile(adapter, fmt, tuple(layers), tuple(sorted(unknown)), len(tensors))


_KOHYA_PART = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PEFT_PART = re.compile(r"^(?P<name>.+?)\.(?:(?P<ab>lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight|alpha)$")


def _classify(key: str) -> tuple[str, str, bool, str] | None:
    """``(network, module name, is_kohya, part)`` of a file key, None if it is none."""
    for prefix, network in KOHYA_PREFIXES.items():
        if key.startswith(prefix) and "." in key:
            layer, elem = key.split(".", 1)
            if elem in _KOHYA_PART:
                return network, layer[len(prefix):].lstrip("_"), True, _KOHYA_PART[elem]
            return None
    for prefix, network in PEFT_PREFIXES.items():
        if key.startswith(prefix):
            m = _PEFT_PART.match(key[len(prefix):])
            if m is None:
                return None
            part = {"lora_A": "down", "lora_B": "up", None: "alpha"}[m["ab"]]
            return network, m["name"], False, part
    return None


def _peft_metadata(metadata: Mapping[str, str]) -> dict:
    raw = metadata.get(_PEFT_METADATA_KEY)
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        log.warning("ignoring unreadable %s metadata in a LoRA file", _PEFT_METADATA_KEY)
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _peft_scale(network: str, name: str, rank: int, alpha: float | None, meta: Mapping) -> float:
    """PEFT's scaling: alpha / r (alpha / sqrt(r) with rsLoRA); alpha from the tensor,
    else the metadata's alpha_pattern (module-name suffix) or lora_alpha, else r."""
    prefix = {"dit": "transformer", "text_encoder": "text_encoder"}[network]
    if alpha is None:
        for pattern, value in (meta.get(f"{prefix}.alpha_pattern") or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", name):
                alpha = float(value)
                break
    if alpha is None and meta.get(f"{prefix}.lora_alpha") is not None:
        alpha = float(meta[f"{prefix}.lora_alpha"])
    if alpha is None:
        return 1.0
    return alpha / math.sqrt(rank) if meta.get(f"{prefix}.use_rslora") else alpha / rank


# --- the modules a LoRA can change ----------------------------------------------------------

def _networks(model) -> dict[str, nn.Module]:
    return {"dit": model.dit, "text_encoder": model.text_encoder.model}


def _takes_lora(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and set(module.kernel_size) == {1} \
        and module.groups == 1


def lora_targets(model, motion_module: bool = False, text_encoder: bool = False) -> dict[str, nn.Module]:
    """The modules a LoRA trainer adapts, upstream's choice: every DiT Linear (and 1x1
    conv), the motion module only when asked, the T5 Linears when asked. Keys are
    qualified names (``dit.<path>``, ``text_encoder.<path>``) as :func:`save_kohya` takes."""
    out = {}
    for network, root in _networks(model).items():
        if network == "text_encoder" and not text_encoder:
            continue
        for name, module in root.named_modules():
            if _takes_lora(module) and (motion_module or MOTION_MODULE not in name):
                out[f"{network}.{name}"] = module
    return out


class _ModuleTable:
    """Module lookup by dotted path and by kohya's '_'-joined path, per network."""

    def __init__(self, model):
        self.modules: dict[str, dict[str, nn.Module]] = {}
        self.kohya: dict[str, dict[str, str | None]] = {}
        for network, root in _networks(model).items():
            mods = dict(root.named_modules())
            self.modules[network] = mods
            table: dict[str, str | None] = {}
            for name in mods:
                flat = name.replace(".", "_")
                table[flat] = None if flat in table else name  # None: two modules flatten alike
            self.kohya[network] = table

    def resolve(self, layer: LoraLayer) -> str | None:
        name = self.kohya[layer.network].get(layer.name) if layer.kohya else layer.name
        if layer.kohya and layer.name in self.kohya[layer.network] and name is None:
            raise CheckpointError(f"LoRA layer {layer.name} is ambiguous: several {layer.network} modules "
                                  f"have that name once '.' is replaced by '_'")
        return name if name in self.modules[layer.network] else None


# --- merging ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterReport:
    adapter: Adapter
    format: str
    total: int                           # keys in the file
    matched: tuple[str, ...]             # keys merged into a module
    unmatched: tuple[str, ...]           # keys naming no module of the model
    modules: tuple[str, ...]             # qualified names of the modules changed

    def summary(self) -> str:
        return (f"{self.adapter.path.name} ({self.format}, weight {self.adapter.weight:g}): "
                f"{len(self.matched)}/{self.total} keys matched, {len(self.modules)} modules")


@dataclass(frozen=True)
class _Update:
    param: str                           # qualified parameter name, e.g. dit.proj_out.weight
    up: torch.Tensor                     # (O, R)
    down: torch.Tensor                   # (R, I)
    factor: float                        # adapter weight * scale


def _plan(lora: LoraFile, table: _ModuleTable) -> tuple[AdapterReport, list[_Update]]:
    """Resolve and shape-check one file against the model; touches nothing."""
    path = lora.adapter.path
    matched, unmatched, modules, updates = [], list(lora.unknown), [], []
    for layer in lora.layers:
        name = table.resolve(layer)
        if name is None:
            unmatched.extend(layer.keys)
            continue
        module = table.modules[layer.network][name]
        qualified = f"{layer.network}.{name}"
        if not _takes_lora(module):
            raise CheckpointError(f"LoRA layers must target a Linear or 1x1 convolution, {path}: {layer.keys[0]} "
                                  f"names {qualified}, a {type(module).__name__}")
        weight = module.weight
        out_f, in_f = weight.shape[0], weight.shape[1]
        up, down = layer.up, layer.down
        up2, down2 = _squeeze_1x1(up), _squeeze_1x1(down)     # (O, R), (R, I)
        rank = down2.shape[0]
        for key, t, flat, want in ((layer.down_key, down, down2, (rank, in_f)), (layer.up_key, up, up2, (out_f, rank))):
            if flat.dim() != 2 or tuple(flat.shape) != want:
                raise CheckpointError(
                    f"LoRA shapes must fit the model, {path}: {key} is {tuple(t.shape)} but {qualified}.weight "
                    f"{tuple(weight.shape)} needs {want}; a LoRA for another model size?")
        matched.extend(layer.keys)
        modules.append(qualified)
        updates.append(_Update(f"{qualified}.weight", up2, down2, lora.adapter.weight * layer.scale))
    if not matched:
        raise CheckpointError(f"LoRA file matches no module of this model: {path} ({lora.total} keys, e.g. "
                              f"{_first(lora)}); expected keys starting with {EXPECTED_PREFIXES}")
    if unmatched:
        log.warning("%s: %d of %d LoRA keys name no module of this model (e.g. %s)", path, len(unmatched),
                    lora.total, min(unmatched))
    report = AdapterReport(lora.adapter, lora.format, lora.total, tuple(matched), tuple(sorted(unmatched)),
                           tuple(modules))
    return report, updates


def _squeeze_1x1(t: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution's LoRA factor (A, B, 1, 1[, 1]) as the matrix (A, B) (upstream
    squeezes the same way, lora_utils.py:416-419)."""
    return t.reshape(t.shape[0], t.shape[1]) if t.dim() > 2 and set(t.shape[2:]) == {1} else t


def _first(lora: LoraFile) -> str:
    keys = [k for layer in lora.layers for k in layer.keys] + list(lora.unknown)
    return min(keys) if keys else "none"


def _parameter(model, qualified: str) -> nn.Parameter:
    network, name = qualified.split(".", 1)
    return _networks(model)[network].get_parameter(name)


class LoraMerger:
    """Merges adapter sets into a model's weights, always from kept base copies.

    The first time a weight is touched its base value is copied (to ``keep_on``, the
    weight's own device when None); every later merge recomputes
    ``W = base + sum_i weight_i * scale_i * up_i @ down_i`` in float32 and writes it into
    the existing parameter in place (CUDA graphs keep their addresses). Switching sets
    or weights therefore never drifts, and :meth:`unmerge` restores the base bit for bit.
    """

    def __init__(self, model, keep_on: str | torch.device | None = "cpu"):
        self.model = model
        self.keep_on = keep_on
        self.adapters: tuple[Adapter, ...] = ()
        self.reports: tuple[AdapterReport, ...] = ()
        self._base: dict[str, torch.Tensor] = {}
        self._files: dict[str, LoraFile] = {}   # by sha256; a switch re-reads nothing
        self._table = _ModuleTable(model)

    @classmethod
    def of(cls, model) -> "LoraMerger":
        """The merger bound to ``model`` (created on first use), so that every merge of
        one model starts from the same base copies."""
        merger = vars(model).get("_lora_merger")
        if merger is None:
            merger = cls(model)
            vars(model)["_lora_merger"] = merger
        return merger

    def _load(self, adapter: Adapter) -> LoraFile:
        lora = self._files.get(adapter.sha256)
        if lora is None:
            lora = self._files[adapter.sha256] = read_lora(adapter)
        # The cache is by content; the weight is the caller's.
        return LoraFile(adapter, lora.format, lora.layers, lora.unknown, lora.total)

    def _prepare(self, adapters: Sequence[Adapter]) -> tuple[list[AdapterReport], dict[str, list[_Update]]]:
        adapters = list(adapters)
        check_unique(adapters)
        reports, by_param = [], {}
        for a in adapters:
            report, updates = _plan(self._load(a), self._table)
            reports.append(report)
            for u in updates:
                by_param.setdefault(u.param, []).append(u)
        return reports, by_param

    def base(self, param: str) -> torch.Tensor:
        """The base value of a parameter (its kept copy once touched)."""
        kept = self._base.get(param)
        return kept if kept is not None else _parameter(self.model, param).detach()

    def merged_state(self, adapters: Sequence[Adapter]) -> dict[str, torch.Tensor]:
        """``{qualified param name: merged weight}`` for every weight the adapters name,
        in the parameter's dtype and device, computed from the base; the model is not
        changed. Names are ``dit.<param>`` / ``text_encoder.<param of T5EncoderModel>``."""
        _, by_param = self._prepare(adapters)
        return {name: self._compute(name, updates) for name, updates in by_param.items()}

    def _compute(self, name: str, updates: Sequence[_Update]) -> torch.Tensor:
        param = _parameter(self.model, name)
        base = self.base(name)
        active = [u for u in updates if u.factor != 0.0]
        if not active:
            return base.to(device=param.device, dtype=param.dtype, copy=True)
        w = base.to(device=param.device, dtype=torch.float32, copy=True)        # (O, I[, 1, 1])
        flat = w.view(w.shape[0], -1)                                            # (O, I)
        for u in active:
            up = u.up.to(device=param.device, dtype=torch.float32)               # (O, R)
            down = u.down.to(device=param.device, dtype=torch.float32)           # (R, I)
            flat.add_(up @ down, alpha=u.factor)
        return w.to(param.dtype)

    @torch.no_grad()
    def merge(self, adapters: Sequence[Adapter]) -> list[AdapterReport]:
        """Make the model base + these adapters (replacing any set merged before).
        Everything is checked before any weight changes."""
        reports, by_param = self._prepare(adapters)
        for name in by_param:
            if name not in self._base:
                p = _parameter(self.model, name).detach()
                self._base[name] = p.to(self.keep_on if self.keep_on is not None else p.device, copy=True)
        for name in self._base:
            param = _parameter(self.model, name)
            if name in by_param:
                param.copy_(self._compute(name, by_param[name]))
            else:
                param.copy_(self._base[name])
        self.adapters = tuple(adapters)
        self.reports = tuple(reports)
        for r in reports:
            log.info("merged LoRA %s", r.summary())
        return reports

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore every touched weight to its base value, bit for bit."""
        for name, kept in self._base.items():
            _parameter(self.model, name).copy_(kept)
        self.adapters, self.reports = (), ()


def merge_loras(model, adapters: Sequence[Adapter]) -> list[AdapterReport]:
    """Merge ``adapters`` (each with its own weight) into ``model``, replacing the set
    merged before; an empty list restores the base model."""
    return LoraMerger.of(model).merge(adapters)


def unmerge_loras(model) -> None:
    merger = vars(model).get("_lora_merger")
    if merger is not None:
        merger.unmerge()


def merged_state(model, adapters: Sequence[Adapter]) -> dict[str, torch.Tensor]:
    """The weights ``adapters`` change, merged from the base, without touching the model
    (ONNX Runtime swaps these in as initializers). See :meth:`LoraMerger.merged_state`."""
    merger = vars(model).get("_lora_merger") or LoraMerger(model)
    return merger.merged_state(adapters)


# --- writing the kohya format ---------------------------------------------------------------

def kohya_name(qualified: str) -> str:
    """``dit.a.b`` -> ``lora_unet__a_b`` (upstream's spelling), ``text_encoder.a.b`` -> ``lora_te_a_b``."""
    network, _, path = qualified.partition(".")
    if network == "dit":
        return "lora_unet__" + path.replace(".", "_")
    if network == "text_encoder":
        return "lora_te_" + path.replace(".", "_")
    raise InputError(f"LoRA module names must start with 'dit.' or 'text_encoder.', got {qualified!r}")


def save_kohya(path: str | Path, tensors_by_module: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
               alpha: float, rank: int, dtype: torch.dtype | None = None,
               metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``{qualified module name: (down (R, I), up (O, R))}`` as a kohya/upstream
    file (``.lora_down.weight``, ``.lora_up.weight``, scalar ``.alpha``), atomically.
    Upstream's merge_lora and its LoRANetwork.load_weights both read it."""
    if not tensors_by_module:
        raise InputError("save_kohya needs at least one module")
    if not (isinstance(rank, int) and rank > 0):
        raise InputError(f"LoRA rank must be a positive integer, got {rank!r}")
    check_weight(alpha, "alpha")
    if alpha <= 0:
        raise InputError(f"LoRA alpha must be positive, got {alpha!r}")
    out: dict[str, torch.Tensor] = {}
    for qualified, (down, up) in tensors_by_module.items():
        name = kohya_name(qualified)
        if down.shape[0] != rank or up.shape[1] != rank:
            raise InputError(f"LoRA tensors of {qualified} must have rank {rank}, got down {tuple(down.shape)} "
                             f"and up {tuple(up.shape)}")
        for t in (down, up):
            if not bool(torch.isfinite(t).all()):
                raise InputError(f"LoRA tensors must be finite, {qualified} has NaN/inf values")
        cast = dtype or down.dtype
        out[f"{name}.lora_down.weight"] = down.detach().to("cpu", cast).contiguous()
        out[f"{name}.lora_up.weight"] = up.detach().to("cpu", cast).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    meta = {"format": "pt", "ss_network_dim": str(rank), "ss_network_alpha": f"{float(alpha):g}",
            **(metadata or {})}
    atomic_save_safetensors(out, path, metadata=meta)
    return Path(path)


# --- what the pipelines call ------------------------------------------------------------------


def adapters_of(loras: Sequence[object]) -> tuple[Adapter, ...]:
    """Adapters from Adapters, ``PATH[:WEIGHT]`` strings or (path, weight) pairs, each file
    checked and hashed before any model loads; the same file twice is an error."""
    adapters = []
    for item in loras:
        if isinstance(item, Adapter):
            adapters.append(item)
        elif isinstance(item, (str, Path)):
            adapters.append(Adapter.parse(str(item)))
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            adapters.append(Adapter.open(item[0], item[1]))
        else:
            raise InputError(f"a LoRA is a path, 'PATH:WEIGHT' or a (path, weight) pair, got {item!r}")
    check_unique(adapters)
    return tuple(adapters)


def merge_logged(model, adapters: Sequence[Adapter]) -> list[AdapterReport]:
    """:func:`merge_loras` (replacing any set merged before), each adapter's matched and
    unmatched keys logged."""
    reports = merge_loras(model, list(adapters))
    for report in reports:
        log.info("%s", report.summary())
    return reports
