"""TensorRT engines (backends ``trt`` and ``rtx``) on a built engine directory
(``easyanimate-rt build --backend trt|rtx``), in two layers:

    TrtLayout        planning only, neither a GPU nor TensorRT: from the manifest and the
                     graph spec, the profile a set of input shapes runs in and every I/O
                     buffer's name, dtype, shape and bytes, at those shapes or at a
                     profile's max shape (what the engine allocates).
    TrtEngine        the plan deserialized with ``tensorrt`` or ``tensorrt_rtx`` and run on
                     torch CUDA buffers: one execution context per optimisation profile,
                     activation memory from a DeviceMemoryPool the pipeline's engines share,
                     persistent I/O buffers, a CUDA graph per prepared shape on request.
    DeviceMemoryPool the shared activation block and the one stream its users run on.

The calls follow TensorRT's documented Python API, which TensorRT 10 and TensorRT-RTX 1.x
share: ``Runtime.deserialize_cuda_engine``, ``create_execution_context(USER_MANAGED)`` and
``set_device_memory``, ``set_optimization_profile_async``, ``set_input_shape``,
``infer_shapes``, ``get_tensor_shape``, ``set_tensor_address``, ``execute_async_v3``.
No TensorRT engine runs where this project is developed (DESIGN.md 5); the parity gate
runs through this class on a user's GPU, so a fault there is a refused engine.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ...engines.buckets import find_profile
from ...engines.build import check_network
from ...engines.manifest import Manifest
from ...engines.tensorrt import collecting_logger, dtype_name, import_backend
from ...errors import EngineError, InputError, MissingDependencyError
from ...export.spec import ExportSpec, Profile
from ..engine import EngineBase

log = logging.getLogger(__name__)

TRT_BACKENDS = ("trt", "rtx")
#: bytes per element of the dtypes TensorRT I/O tensors take
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int64": 8, "int32": 4, "int8": 1,
            "uint8": 1, "bool": 1}
_ALIGN = 256  # TensorRT wants its device memory 256-byte aligned (torch's blocks are 512-aligned)


def _torch():
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("torch", "", "TensorRT engines (their device buffers)") from None
    return torch


# --- planning: no GPU, no TensorRT ---------------------------------------------------------


@dataclass(frozen=True)
class TensorPlan:
    """One I/O buffer."""

    name: str
    mode: str                 # input | output
    dtype: str                # float32, float16, bfloat16, int64 ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        if self.dtype not in ITEMSIZE:
            raise EngineError(f"tensor {self.name}: no buffer size known for dtype {self.dtype!r}")
        return self.numel * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class BufferPlan:
    """The buffers of one profile at one set of shapes. ``device_memory``: the activation
    bytes the manifest records for the profile (None: not recorded, the engine reports it
    once deserialized)."""

    profile: int
    dims: Mapping[str, int]
    tensors: tuple[TensorPlan, ...]
    device_memory: int | None = None

    @property
    def inputs(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.mode == "input")

    @property
    def outputs(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.mode == "output")

    @property
    def nbytes(self) -> int:
        """I/O bytes (activations not included)."""
        return sum(t.nbytes for t in self.tensors)

    def __getitem__(self, name: str) -> TensorPlan:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


class TrtLayout(EngineBase):
    """What a TensorRT engine directory promises, read from its manifest and the graph
    spec without TensorRT: its profiles, its I/O (the manifest's ``io`` record of the
    built network where there is one, else the spec's), and buffer plans. An EngineBase,
    so a shape outside every profile is the runtime's usual ShapeError naming the built
    shapes."""

    def __init__(self, manifest: Manifest, spec: ExportSpec):
        self.manifest = manifest
        self.spec = spec
        self._profiles = [Profile(p["name"], {k: tuple(v) for k, v in p["dims"].items()})
                          for p in manifest.profiles]
        self.io: tuple[tuple[str, str, str], ...] = self._io_table()

    def _io_table(self) -> tuple[tuple[str, str, str], ...]:
        """(name, mode, dtype) per I/O tensor in the spec's order; an EngineError when the
        built network's tensors are not the spec's."""
        spec_io = tuple([(t.name, "input", t.dtype) for t in self.spec.inputs]
                        + [(t.name, "output", t.dtype) for t in self.spec.outputs])
        if not self.manifest.io:
            return spec_io
        built = {e["name"]: (e["name"], e["mode"], e["dtype"]) for e in self.manifest.io}
        if sorted(v[:2] for v in built.values()) != sorted(v[:2] for v in spec_io):
            raise EngineError(f"{self.manifest.key}: the engine's tensors {sorted(v[:2] for v in built.values())} are "
                              f"not the graph spec's {sorted(v[:2] for v in spec_io)}; rebuild with "
                              f"`easyanimate-rt build`")
        return tuple(built[name] for name, _, _ in spec_io)

    def profile_index(self, shapes: Mapping[str, Sequence[int]]) -> int:
        """The optimisation profile ``shapes`` run in (the first that holds them, as the
        builder's bucket index does); a ShapeError naming the built shapes otherwise."""
        index = find_profile(self.profiles(), self.check(shapes))
        assert index is not None  # check() raised otherwise
        return index

    def plan(self, shapes: Mapping[str, Sequence[int]]) -> BufferPlan:
        """The buffers of a run at ``shapes`` (input name -> shape)."""
        absent = [t.name for t in self.spec.inputs if t.name not in shapes]
        if absent:
            raise InputError(f"{self.spec.key}: no shape for the inputs {absent}")
        shapes = {t.name: tuple(int(s) for s in shapes[t.name]) for t in self.spec.inputs}
        index = self.profile_index(shapes)
        dims = self.spec.dims_of(shapes)
        return self._plan(index, dims, shapes)

    def max_plan(self, index: int) -> BufferPlan:
        """The buffers of profile ``index`` at its max shape: what serves every shape in it.
        Inputs take the shapes the plan was built with (the manifest's), outputs follow
        the spec."""
        if not 0 <= index < len(self._profiles):
            raise EngineError(f"{self.manifest.key} has {len(self._profiles)} profiles, no profile {index}")
        dims = {k: v[2] for k, v in self._profiles[index].dims.items()}
        built = self.manifest.profiles[index].get("shapes", {})
        shapes = {name: tuple(built[name][2]) if name in built else shape
                  for name, shape in self.spec.input_shapes(dims).items()}
        return self._plan(index, dims, shapes)

    def _plan(self, index: int, dims: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]) -> BufferPlan:
        out_shapes = self.spec.output_shapes(dims)
        memory = self.manifest.device_memory[index] if index < len(self.manifest.device_memory) else None
        tensors = tuple(TensorPlan(name, mode, dtype, shapes[name] if mode == "input" else out_shapes[name])
                        for name, mode, dtype in self.io)
        return BufferPlan(index, dict(dims), tensors, memory)


# --- shared device memory -------------------------------------------------------------------


class DeviceMemoryPool:
    """Activation memory for a pipeline's TensorRT engines and the one stream they run on.

    The engines of a generation run one after another, so one block the size of the
    largest request serves them all; they share the stream because that is what makes
    sharing safe: work on one stream is ordered, so no two engines use the block at once.
    ``reserve(n)`` grows the block (never shrinks it) and bumps ``generation``; an engine
    compares the generation before it runs, points its contexts at the new block and
    recaptures its CUDA graphs (they hold the old address). The block is freed when the
    last engine detaches."""

    def __init__(self, device: str = "cuda"):
        self.device = device
        self.generation = 0
        self._block = None
        self._stream = None
        self._users: set[int] = set()

    @property
    def stream(self):
        """The stream every engine of this pool enqueues on (created on first use)."""
        if self._stream is None:
            self._stream = _torch().cuda.Stream(device=self.device)
        return self._stream

    @property
    def size(self) -> int:
        return 0 if self._block is None else int(self._block.numel())

    @property
    def pointer(self) -> int:
        return 0 if self._block is None else int(self._block.data_ptr())

    def reserve(self, nbytes: int) -> None:
        """At least ``nbytes`` of activation memory from now on."""
        if nbytes <= self.size:
            return
        torch = _torch()
        if self._block is not None:
            self.stream.synchronize()  # queued work may still use the old block (only at prepare time)
            self._block = None         # freed before the larger block is taken
        self._block = torch.empty(-(-nbytes // _ALIGN) * _ALIGN, dtype=torch.uint8, device=self.device)
        self.generation += 1
        log.debug("TensorRT activation memory: %d bytes on %s", self.size, self.device)

    def attach(self, user: object) -> None:
        self._users.add(id(user))

    def detach(self, user: object) -> None:
        self._users.discard(id(user))
        if not self._users and self._block is not None:
            if self._stream is not None:
                self._stream.synchronize()
            self._block = None
            self.generation += 1


_SHARED: dict[str, DeviceMemoryPool] = {}


def shared_pool(device: str = "cuda") -> DeviceMemoryPool:
    """The process's pool for ``device``: engines loaded without a pool of their own share
    it (and its stream), so a pipeline's text encoder, DiT and decoders hold one
    activation block between them."""
    if device not in _SHARED:
        _SHARED[device] = DeviceMemoryPool(device)
    return _SHARED[device]


# --- the engine -----------------------------------------------------------------------------


@dataclass
class _Prepared:
    """One prepared set of input shapes: its plan, buffer views and CUDA graph."""

    key: tuple
    plan: BufferPlan
    buffers: dict[str, Any]          # name -> torch tensor (a view of the profile's max-size buffer)
    cuda_graph: bool = False         # asked for
    graph: Any = None                # torch.cuda.CUDAGraph, or None: eager
    stale: bool = field(default=False)  # the pool moved since capture: recapture before the next run


class TrtEngine(TrtLayout):
    """One network of a ``trt`` or ``rtx`` engine directory, checked against its manifest
    (artefact hash, library version, GPU, source graph) before the plan is deserialized.

    One execution context per optimisation profile, created on first use: a context
    keeps its profile and the shapes and addresses last bound, so moving between buckets
    of different profiles needs no ``set_optimization_profile_async`` (which enqueues
    work and unbinds every shape) and a CUDA graph captured on one context stays valid
    while another runs. The contexts hold no activation memory of their own
    (USER_MANAGED: all point at the shared pool's block), which is what makes one per
    profile cheap; the cost is one TensorRT-RTX JIT pass per profile used.

    I/O buffers: per profile, one zero-filled buffer per tensor at the profile's max
    shape (allocated when the profile is first prepared); each prepared shape uses views
    of them. Zero-filled, because the capture's warm-up runs on whatever they hold and
    garbage token ids could index out of range. ``run`` returns views of the output
    buffers (torch tensors on the device), valid until the next run.
    """

    def __init__(self, directory: str | Path, spec: ExportSpec, onnx_path: str | Path | None = None, *,
                 pool: DeviceMemoryPool | None = None, compute_capability: str | None = None):
        directory = Path(directory)
        manifest = check_network(directory, onnx_path, compute_capability)
        if manifest.backend not in TRT_BACKENDS:
            raise EngineError(f"{directory} holds a {manifest.backend} engine, not a TensorRT plan")
        super().__init__(manifest, spec)
        self.trt = import_backend(manifest.backend)
        self.pool = pool if pool is not None else shared_pool()
        self._messages: list[str] = []
        self._logger = collecting_logger(self.trt, self._messages)  # kept alive as long as the runtime
        self._runtime = self.trt.Runtime(self._logger)
        path = directory / manifest.artifact["file"]
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{path}: {self._library()} could not deserialize the plan ({self._last_messages()}); "
                              f"rebuild with `easyanimate-rt build`")
        self._check_engine()
        self._contexts: dict[int, Any] = {}
        self._buffers: dict[int, dict[str, Any]] = {}
        self._states: dict[tuple, _Prepared] = {}
        self._bound: dict[int, tuple] = {}  # profile -> key of the shapes its context holds
        self.pool.reserve(self._engine_memory())
        self.pool.attach(self)
        self._generation = self.pool.generation
        self._closed = False

    # -- checks -----------------------------------------------------------------------

    def _library(self) -> str:
        return f"{self.trt.__name__} {getattr(self.trt, '__version__', '')}".strip()

    def _last_messages(self) -> str:
        return "; ".join(self._messages[-3:]) or "no message from TensorRT"

    def _check_engine(self) -> None:
        """The deserialized engine has the spec's tensors and the manifest's profiles;
        its own dtypes are what the buffers hold."""
        e, key = self.engine, self.manifest.key
        got = {}
        for i in range(e.num_io_tensors):
            name = e.get_tensor_name(i)
            mode = "input" if e.get_tensor_mode(name) == self.trt.TensorIOMode.INPUT else "output"
            got[name] = (mode, dtype_name(e.get_tensor_dtype(name)))
        want = {name: mode for name, mode, _ in self.io}
        if {n: m for n, (m, _) in got.items()} != want:
            raise EngineError(f"{key}: the plan's tensors {sorted(got)} are not the graph spec's {sorted(want)}; "
                              f"rebuild with `easyanimate-rt build`")
        self.io = tuple((name, mode, got[name][1]) for name, mode, _ in self.io)
        if e.num_optimization_profiles != len(self._profiles):
            raise EngineError(f"{key}: the plan has {e.num_optimization_profiles} optimisation profiles, its manifest "
                              f"{len(self._profiles)}; rebuild with `easyanimate-rt build`")
        for i, p in enumerate(self.manifest.profiles):
            for name, recorded in p.get("shapes", {}).items():
                built = [tuple(s) for s in e.get_tensor_profile_shape(name, i)]
                if built != [tuple(s) for s in recorded]:
                    raise EngineError(f"{key}: profile {i} of the plan gives {name} min/opt/max {built}, the manifest "
                                      f"{recorded}; rebuild with `easyanimate-rt build`")

    def _engine_memory(self) -> int:
        size = getattr(self.engine, "device_memory_size_v2", None)  # the max over profiles
        return int(self.engine.device_memory_size if size is None else size)

    # -- contexts and memory ------------------------------------------------------------

    def _set_memory(self, context) -> None:
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(self.pool.pointer, self.pool.size)
        else:  # TensorRT 10.0: the property alone
            context.device_memory = self.pool.pointer

    def _context(self, index: int):
        """The execution context of profile ``index``, created on first use."""
        context = self._contexts.get(index)
        if context is None:
            context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise EngineError(f"{self.manifest.key}: {self._library()} could not create an execution context "
                                  f"({self._last_messages()})")
            self._set_memory(context)
            if not context.set_optimization_profile_async(index, self.pool.stream.cuda_stream):
                raise EngineError(f"{self.manifest.key}: {self._library()} refused optimisation profile {index} "
                                  f"({self._last_messages()})")
            self._contexts[index] = context
        return context

    def _follow_pool(self) -> None:
        """After the pool's block moved: every context onto the new block, and the CUDA
        graphs (which hold the old address) marked for recapture."""
        if self._generation == self.pool.generation:
            return
        for context in self._contexts.values():
            self._set_memory(context)
        for state in self._states.values():
            if state.graph is not None:
                state.graph, state.stale = None, True
        self._generation = self.pool.generation

    def _profile_buffers(self, index: int) -> dict[str, Any]:
        if index not in self._buffers:
            torch = _torch()
            self._buffers[index] = {t.name: torch.zeros(t.numel, dtype=getattr(torch, t.dtype), device=self.pool.device)
                                    for t in self.max_plan(index).tensors}
        return self._buffers[index]

    def _bind(self, state: _Prepared):
        """The context of ``state``'s profile holding its shapes and addresses."""
        index = state.plan.profile
        context = self._context(index)
        if self._bound.get(index) == state.key:
            self._follow_pool()
            return context
        key = self.manifest.key
        for t in state.plan.inputs:
            if not context.set_input_shape(t.name, t.shape):
                raise EngineError(f"{key}: {self._library()} refused shape {t.shape} for {t.name} in profile {index} "
                                  f"({self._last_messages()})")
        update = getattr(context, "update_device_memory_size_for_shapes", None)
        if update is not None:  # TensorRT-RTX: activation size for these shapes, maybe above the engine's figure
            self.pool.reserve(int(update()))
            self._set_memory(context)
        self._follow_pool()
        missing = context.infer_shapes()
        if missing:
            raise EngineError(f"{key}: {self._library()} lacks shapes for {list(missing)}")
        for t in state.plan.outputs:
            got = tuple(context.get_tensor_shape(t.name))
            if got != t.shape:
                raise EngineError(f"{key}: the plan gives {t.name} shape {got} where the graph spec says {t.shape}; "
                                  f"the plan and the spec disagree, rebuild with `easyanimate-rt build`")
        for name, buffer in state.buffers.items():
            if not context.set_tensor_address(name, buffer.data_ptr()):
                raise EngineError(f"{key}: {self._library()} refused the address of {name} ({self._last_messages()})")
        self._bound[index] = state.key
        return context

    def _execute(self, context, stream) -> None:
        if not context.execute_async_v3(stream.cuda_stream):
            raise EngineError(f"{self.manifest.key}: {self._library()} execute_async_v3 failed "
                              f"({self._last_messages()})")

    # -- the Engine protocol --------------------------------------------------------------

    def prepare(self, shapes: Mapping[str, Sequence[int]], cuda_graph: bool = False) -> None:
        """Bind the buffers for ``shapes`` to the context of the profile that holds them
        (a ShapeError naming the built shapes if none does) and, with ``cuda_graph``,
        capture the engine's launch: one warm-up run, capture, replay from then on; a
        failed capture leaves it eager with one log line."""
        self._check_open()
        plan = self.plan(shapes)
        key = tuple(t.shape for t in plan.inputs)
        state = self._states.get(key)
        if state is None:
            views = self._profile_buffers(plan.profile)
            state = _Prepared(key, plan, {t.name: views[t.name][: t.numel].view(t.shape) for t in plan.tensors})
            self._states[key] = state
        self._bind(state)
        state.cuda_graph = cuda_graph
        if not cuda_graph:
            state.graph, state.stale = None, False
        elif state.graph is None:
            state.graph = self._capture(state)

    def _capture(self, state: _Prepared):
        """A CUDA graph of this state's ``execute_async_v3``, or None (eager) with one log
        line when TensorRT cannot be captured or the capture fails."""
        torch = _torch()
        stream = self.pool.stream
        try:
            context = self._bind(state)
            capturable = getattr(context, "is_stream_capturable", None)  # TensorRT-RTX
            if capturable is not None and not capturable(stream.cuda_stream):
                raise EngineError("the context reports it cannot be stream-captured (RTX plans need "
                                  "require_user_allocation)")
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self._execute(context, stream)  # warm-up: deferred shape work, lazy allocations, RTX kernels
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self._execute(context, stream)
            torch.cuda.current_stream().wait_stream(stream)
        except Exception as exc:  # capture is an optimisation: never a failed run
            log.warning("%s: CUDA graph capture failed (%s: %s); running TensorRT eagerly", self.manifest.key,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return None
        return graph

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Copy ``feeds`` (numpy arrays or torch tensors; a feed that is already the input
        buffer is not copied) into the input buffers, launch (the CUDA graph when
        prepared with one) and return views of the output buffers. Shapes not prepared
        are prepared eagerly first. No host synchronisation for device feeds: the
        engine's stream waits for the caller's and the caller's for the engine's."""
        self._check_open()
        torch = _torch()
        absent = [n for n in self.spec.input_names if n not in feeds]
        if absent:
            raise InputError(f"{self.manifest.key}: feeds lack the inputs {absent}")
        key = tuple(tuple(int(s) for s in feeds[n].shape) for n in self.spec.input_names)
        state = self._states.get(key)
        if state is None:
            self.prepare(dict(zip(self.spec.input_names, key)))
            state = self._states[key]
        self._follow_pool()
        if state.stale:
            state.stale = False
            state.graph = self._capture(state)
        stream = self.pool.stream
        stream.wait_stream(torch.cuda.current_stream())  # inputs may come from the caller's stream
        with torch.cuda.stream(stream):
            for t in state.plan.inputs:
                _copy_in(torch, state.buffers[t.name], feeds[t.name])
            if state.graph is not None:
                state.graph.replay()
            else:
                self._execute(self._bind(state), stream)
        torch.cuda.current_stream().wait_stream(stream)
        return {t.name: state.buffers[t.name] for t in state.plan.outputs}

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError(f"{self.manifest.key}: the engine is closed")

    def close(self) -> None:
        """Free the graphs, contexts, buffers and engine (in that order) and leave the pool."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if self.pool._stream is not None:
            self.pool.stream.synchronize()  # nothing queued may touch what is freed below
        self._states.clear()
        self._bound.clear()
        self._contexts.clear()
        self._buffers.clear()
        self.engine = None
        self._runtime = None
        self.pool.detach(self)


def _copy_in(torch, buffer, value) -> None:
    """``value`` into ``buffer`` (cast to its dtype) on the current stream."""
    if isinstance(value, torch.Tensor):
        if value.data_ptr() == buffer.data_ptr() and value.dtype == buffer.dtype and value.shape == buffer.shape:
            return  # the caller wrote into the input buffer itself
        buffer.copy_(value, non_blocking=True)
    else:
        buffer.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def load_engine(directory, spec: ExportSpec, onnx_path=None, *, device: str = "cuda",
                pool: DeviceMemoryPool | None = None, compute_capability: str | None = None,
                **_ignored: Any) -> TrtEngine:
    """The registry's loader (runtime/backends): one network of a ``trt`` or ``rtx`` engine
    directory, on the process's shared pool for ``device`` unless given one. Options of
    the other loaders (threads, spinning) mean nothing here."""
    device = "cuda" if device in ("auto", "gpu") else device
    return TrtEngine(directory, spec, onnx_path, pool=pool if pool is not None else shared_pool(device),
                     compute_capability=compute_capability)
