"""Which backend runs each network, and on which device (the command line's and the
API's ``backend=`` and ``device=``), decided once before any work: names from the
registry (runtime/backends), ``auto`` resolved for the device, every choice checked
(installed, on its device, taking the precision), each failure naming the rule."""

from __future__ import annotations

from typing import Mapping

from ..engines.manifest import cuda_visible
from ..errors import InputError
from ..export.spec import GraphKey
from .backends import NAMES, choose_auto, require
from .backends import backend as backend_entry

NETWORKS = ("text_encoder", "dit", "vae")
TORCH = ("torch", "torch-compile")  # the reference modules, eager or under torch.compile
TORCH_PRECISIONS = ("fp32", "bf16", "fp16")


def parse_backend(text: str) -> dict[str, str]:
    """``"ort-cpu"`` -> every network on that backend (runtime/backends: the registry's
    names; ``ort`` is ``ort-cpu``); ``"dit=trt,vae=ort-cuda"`` -> per network (networks
    not named run on ``auto``, which :func:`resolve_backends` decides)."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"backend must be one of {['auto', *NAMES]} or NETWORK=BACKEND pairs, got {text!r}")
    if "=" not in text:
        choice = dict.fromkeys(NETWORKS, text.strip())
    else:
        choice = dict.fromkeys(NETWORKS, "auto")
        named: set[str] = set()
        for part in text.split(","):
            name, eq, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not eq:
                raise InputError(f"backend: {part.strip()!r} in {text!r} is not NETWORK=BACKEND; give every network "
                                 f"as NETWORK=BACKEND, e.g. dit=ort,vae=torch")
            if name not in NETWORKS:
                raise InputError(f"backend: unknown network {name!r} in {text!r}; networks: {list(NETWORKS)}")
            if name in named:
                raise InputError(f"backend: network {name!r} is named twice in {text!r}; name each network once")
            named.add(name)
            choice[name] = value
    for name, value in choice.items():
        if value != "auto" and value not in NAMES:
            raise InputError(f"backend for {name} must be one of {['auto', *NAMES]}, got {value!r}")
    return {name: value if value == "auto" else backend_entry(value).name for name, value in choice.items()}


def resolve_backends(choice: Mapping[str, str], device: str, precision: str | None = None) -> dict[str, str]:
    """``choice`` (parse_backend) with ``auto`` decided for ``device`` (runtime/backends'
    choose_auto) and each backend checked before any work: installed, on a device it runs
    on, taking ``precision``. Each failure names what is missing or the rule."""
    out = {}
    auto = None
    for network, name in choice.items():
        if name == "auto":
            auto = auto or choose_auto(device=device)[0]
            name = auto.name
        entry = backend_entry(name)
        require(entry, device=device)  # the library first, then the GPU: each names what is missing
        if entry.device == "cpu" and device != "cpu":
            raise InputError(f"backend {name} runs on the CPU, but the run is on {device}; use --device cpu, or a "
                             f"GPU backend (trt, ort-cuda, torch)")
        if precision is not None and precision not in entry.precisions:
            raise InputError(f"backend {name} runs {list(entry.precisions)}; got precision {precision!r}")
        out[network] = name
    return out


def uses_torch(backends: Mapping[str, str]) -> bool:
    return any(b in TORCH for b in backends.values())


def resolve_device(device: str, cpu_backend: bool = False) -> str:
    """``auto``: cuda when a CUDA device is visible (checked without importing torch on a
    machine with no NVIDIA driver) and no CPU backend was asked for; else cpu."""
    if device != "auto":
        if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
            raise InputError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
        if device != "cpu":
            _check_cuda(device)
        return device
    return "cuda" if not cpu_backend and cuda_visible() else "cpu"


def network_of(key: str) -> str:
    """The backend choice a graph follows: ``vae_decoder/first`` -> vae, ``dit_cache/head`` -> dit."""
    return GraphKey.parse(key).choice


def _check_cuda(device: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is visible (torch.cuda.is_available() is False)")


def torch_dtype(precision: str):
    """The torch dtype of the torch backends' ``precision``."""
    import torch

    if precision not in TORCH_PRECISIONS:
        raise InputError(f"precision for the torch backend must be one of {list(TORCH_PRECISIONS)}, got {precision!r}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
