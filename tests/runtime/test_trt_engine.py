"""TensorRT engines in the runtime (runtime/backends/trt.py) where no TensorRT engine can
run (DESIGN.md 5):

- the planning layer against a real plan, built ahead of time with TensorRT-RTX for the
  tiny text encoder with two optimisation profiles: the profile each shape runs in, the
  ShapeError for a shape outside both, the buffers' names, dtypes, shapes and bytes;
- TrtEngine against a fake ``tensorrt_rtx`` module (a runtime, engine and context that
  record their calls and compute a known function of the inputs) and a fake torch.cuda:
  the order and arguments of the TensorRT calls, CUDA graph capture and its eager
  fallback with one log line, the shared device memory pool;
- the same fake TensorRT on a real GPU (marker ``gpu``): torch's streams, CUDA graph
  capture and replay around ``execute_async_v3``.
"""

from __future__ import annotations

import enum
import logging
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from needs import ON_CI

from easyanimate_rt.engines import tensorrt_rtx as rtx
from easyanimate_rt.engines.build import PLAN_NAME, check_network, widen
from easyanimate_rt.engines.manifest import Manifest, digest, onnx_files
from easyanimate_rt.engines.tensorrt import import_backend
from easyanimate_rt.errors import EngineError, MissingDependencyError, ShapeError
from easyanimate_rt.export.spec import Profile, text_encoder_spec
from easyanimate_rt.fileio import sha256_files
from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.runtime.backends.trt import DeviceMemoryPool, TrtEngine, TrtLayout

# Two profiles with a gap between them: batch 1..2 (opt 2) and 4..8 (opt 6).
PROFILES = (Profile("b1-2", {"batch": (1, 2, 2)}), Profile("b4-8", {"batch": (4, 6, 8)}))
needs_rtx = pytest.mark.skipif(not rtx.is_available() and not ON_CI,
                               reason="tensorrt-rtx is not installed (extra: rtx)")


def write_engine_dir(directory: Path, spec, plan: bytes, *, backend: str, versions: dict, onnx_path: Path | None = None,
                     io: list | None = None, device_memory: list | None = None) -> Path:
    """An engine directory as ``build`` writes one (engines/build.py ``_build_entry``), with
    the manifest fields it should fill from PlanBuild (``io``, ``device_memory``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / PLAN_NAME).write_bytes(plan)
    Manifest(
        key=spec.key, backend=backend, precision=spec.precision.name,
        onnx_sha256=sha256_files(onnx_files(onnx_path)) if onnx_path else "0" * 64,
        spec_sha256=digest(spec.to_dict()), buckets={p.name: i for i, p in enumerate(spec.profiles)},
        profiles=[{"name": p.name, "dims": {k: list(v) for k, v in p.dims.items()},
                   "shapes": {k: [list(s) for s in v] for k, v in spec.profile_shapes(p).items()}}
                  for p in spec.profiles],
        flags={}, versions=versions, target={"kind": "aot", "compute_capability": "SM89"},
        artifact={"file": PLAN_NAME, "bytes": len(plan), "sha256": sha256_files([directory / PLAN_NAME])},
        build_seconds=0.0, device_memory=list(device_memory or []), io=list(io or [])).save(directory)
    return directory


def shapes_at(batch: int) -> dict[str, tuple[int, int]]:
    return {"input_ids": (batch, 16), "attention_mask": (batch, 16)}


# --- the planning layer on a real TensorRT-RTX plan ------------------------------------------


@pytest.fixture(scope="module")
def rtx_engine(exports, tmp_path_factory):
    """The tiny text encoder built ahead of time (SM89) with the two PROFILES, installed as
    an engine directory; (directory, export spec, PlanBuild, onnx path)."""
    from easyanimate_rt.engines.tensorrt import build_plan

    spec, onnx_path = exports.written("tiny", "text_encoder")
    built_spec = widen(spec, PROFILES)
    built = build_plan(rtx._import(), onnx_path, [built_spec.profile_shapes(p) for p in PROFILES],
                       compute_capability="SM89")
    directory = write_engine_dir(tmp_path_factory.mktemp("rtx") / "text_encoder", built_spec, built.plan,
                                 backend="rtx", versions={"tensorrt_rtx": rtx.version()}, onnx_path=onnx_path,
                                 io=built.io, device_memory=built.device_memory)
    return directory, spec, built, onnx_path


@pytest.mark.tensorrt
@needs_rtx
def test_build_records_io_and_leaves_device_memory_to_a_gpu(rtx_engine):
    directory, spec, built, onnx_path = rtx_engine
    assert built.io == [{"name": "input_ids", "mode": "input", "dtype": "int64"},
                        {"name": "attention_mask", "mode": "input", "dtype": "int64"},
                        {"name": "text_embeddings", "mode": "output", "dtype": "float32"}]
    assert built.device_memory == []  # the AOT builder does not report it and no GPU can deserialize here
    manifest = check_network(directory, onnx_path)  # what TrtEngine runs first: hash, versions, source graph
    assert manifest.io == built.io and len(manifest.profiles) == 2
    # RTX plans that may be captured in a CUDA graph take all their memory from the application
    from easyanimate_rt.engines.tensorrt import build_plan

    user = build_plan(rtx._import(), onnx_path, [widen(spec, PROFILES).profile_shapes(p) for p in PROFILES],
                      compute_capability="SM89", require_user_allocation=True)
    assert user.plan != built.plan and user.io == built.io


@pytest.mark.tensorrt
@needs_rtx
def test_buffer_plan_of_a_real_plan(rtx_engine):
    directory, spec, built, _ = rtx_engine
    layout = TrtLayout(Manifest.load(directory), spec)  # the export's spec, as the runtime passes it
    for batch, profile in ((1, 0), (2, 0), (4, 1), (5, 1), (8, 1)):
        assert layout.profile_index(shapes_at(batch)) == profile
        plan = layout.plan(shapes_at(batch))
        assert plan.profile == profile and dict(plan.dims) == {"batch": batch}
        assert [(t.name, t.mode, t.dtype, t.shape) for t in plan.tensors] == [
            ("input_ids", "input", "int64", (batch, 16)), ("attention_mask", "input", "int64", (batch, 16)),
            ("text_embeddings", "output", "float32", (batch, 16, 32))]
        assert [t.nbytes for t in plan.tensors] == [batch * 16 * 8, batch * 16 * 8, batch * 16 * 32 * 4]
        assert plan.nbytes == batch * (2 * 16 * 8 + 16 * 32 * 4) and plan.device_memory is None
    for batch in (3, 9):  # in the gap, and above both
        with pytest.raises(ShapeError, match=r"outside every profile this engine was built for \(2, 6\)"):
            layout.plan(shapes_at(batch))
    for index, top in ((0, 2), (1, 8)):
        biggest = layout.max_plan(index)
        # the max shapes are the ones TensorRT built the profile with
        assert biggest["input_ids"].shape == built.inputs["input_ids"][3 * index + 2] == (top, 16)
        assert biggest["text_embeddings"].shape == (top, 16, 32)
        assert biggest.nbytes == layout.plan(shapes_at(top)).nbytes


def test_layout_without_an_io_record_follows_the_spec(tmp_path):
    spec = widen(text_encoder_spec(from_preset("tiny")), PROFILES)
    d = write_engine_dir(tmp_path / "te", spec, b"plan", backend="rtx", versions={}, device_memory=[4096, 8192])
    layout = TrtLayout(Manifest.load(d), spec)
    assert layout.io == (("input_ids", "input", "int64"), ("attention_mask", "input", "int64"),
                         ("text_embeddings", "output", "float32"))
    assert layout.plan(shapes_at(5)).device_memory == 8192 and layout.max_plan(0).device_memory == 4096
    wrong = write_engine_dir(tmp_path / "other", spec, b"plan", backend="rtx", versions={},
                             io=[{"name": "tokens", "mode": "input", "dtype": "int64"}])
    with pytest.raises(EngineError, match="not the graph spec's"):
        TrtLayout(Manifest.load(wrong), spec)
    bad = Manifest.load(d).to_dict() | {"io": [{"name": "x", "mode": "sideways", "dtype": "int64"}]}
    with pytest.raises(EngineError, match="field 'io'"):
        Manifest.from_dict(bad)


# --- fakes: tensorrt_rtx and torch.cuda --------------------------------------------------------


class _Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class _ILogger:
    Severity = _Severity

    def __init__(self, *args):
        pass


class _Logger(_ILogger):
    ERROR, WARNING = _Severity.ERROR, _Severity.WARNING


DataType = enum.Enum("DataType", "FLOAT HALF BF16 INT64 INT32 BOOL")
TensorIOMode = enum.Enum("TensorIOMode", "NONE INPUT OUTPUT")
Strategy = enum.Enum("ExecutionContextAllocationStrategy", "STATIC ON_PROFILE_CHANGE USER_MANAGED")
EngineValidity = enum.Enum("EngineValidity", "VALID SUBOPTIMAL INVALID")
_TRT_DTYPES = {"float32": DataType.FLOAT, "int64": DataType.INT64}
_TYPESTR = {torch.int64: "<i8", torch.float32: "<f4"}


def tensor_at(address: int, shape, dtype, device: str) -> torch.Tensor:
    """A torch view of memory the engine only knows by address (what TensorRT sees)."""
    iface = {"shape": tuple(shape), "typestr": _TYPESTR[dtype], "data": (address, False), "version": 3,
             "strides": None}
    holder = types.SimpleNamespace()
    if device == "cpu":
        holder.__array_interface__ = iface
        return torch.from_numpy(np.asarray(holder))
    holder.__cuda_array_interface__ = iface
    return torch.as_tensor(holder, device=device)


def expected_embeddings(input_ids, attention_mask) -> np.ndarray:
    """The fake engine's function: every channel of token (b, s) is id + mask / 2."""
    value = np.asarray(input_ids, dtype=np.float32) + 0.5 * np.asarray(attention_mask, dtype=np.float32)
    return np.repeat(value[..., None], 32, axis=-1)


class FakeWorld:
    """What the fake TensorRT knows and records: the plan's spec, its calls in order."""

    def __init__(self, spec, plan: bytes, device: str = "cpu"):
        self.spec, self.plan, self.device = spec, plan, device
        self.calls: list[tuple] = []
        self.memory = 4096          # device_memory_size_v2
        self.shape_memory = 4096    # update_device_memory_size_for_shapes
        self.capturable = True
        self.capturing = None       # the fake CUDA graph being captured (CPU fakes)

    def module(self) -> types.ModuleType:
        world = self
        mod = types.ModuleType("tensorrt_rtx")
        mod.__version__ = "9.9.9-fake"
        mod.ILogger, mod.Logger = _ILogger, _Logger
        mod.DataType, mod.TensorIOMode, mod.EngineValidity = DataType, TensorIOMode, EngineValidity
        mod.ExecutionContextAllocationStrategy = Strategy

        class Runtime:
            def __init__(self, logger):
                self.logger = logger

            def get_engine_validity(self, plan):
                return EngineValidity.VALID, 0

            def deserialize_cuda_engine(self, plan):
                world.calls.append(("deserialize_cuda_engine",))
                return FakeEngine(world) if bytes(plan) == world.plan else None

        mod.Runtime = Runtime
        return mod


class FakeEngine:
    def __init__(self, world: FakeWorld):
        self.world = world
        spec = world.spec
        self.tensors = [(t.name, TensorIOMode.INPUT, t.dtype) for t in spec.inputs] + \
                       [(t.name, TensorIOMode.OUTPUT, t.dtype) for t in spec.outputs]
        self.num_io_tensors = len(self.tensors)
        self.num_optimization_profiles = len(spec.profiles)
        self.device_memory_size_v2 = world.memory

    def get_tensor_name(self, i):
        return self.tensors[i][0]

    def get_tensor_mode(self, name):
        return next(m for n, m, _ in self.tensors if n == name)

    def get_tensor_dtype(self, name):
        return _TRT_DTYPES[next(d for n, _, d in self.tensors if n == name)]

    def get_tensor_profile_shape(self, name, index):
        return [list(s) for s in self.world.spec.profile_shapes(self.world.spec.profiles[index])[name]]

    def create_execution_context(self, strategy):
        self.world.calls.append(("create_execution_context", strategy.name))
        return FakeContext(self.world)


class FakeContext:
    def __init__(self, world: FakeWorld):
        self.world = world
        self.profile = 0
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def _call(self, *args):
        self.world.calls.append(args)

    def set_device_memory(self, pointer, size):
        self._call("set_device_memory", pointer, size)

    def set_optimization_profile_async(self, index, stream):
        self._call("set_optimization_profile_async", index, stream)
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        self._call("set_input_shape", name, tuple(shape))
        lo, _, hi = self.world.spec.profiles[self.profile].dims["batch"]
        self.shapes[name] = tuple(shape)
        return lo <= shape[0] <= hi

    def update_device_memory_size_for_shapes(self):
        self._call("update_device_memory_size_for_shapes")
        return self.world.shape_memory

    def infer_shapes(self):
        self._call("infer_shapes")
        return [t.name for t in self.world.spec.inputs if t.name not in self.shapes]

    def get_tensor_shape(self, name):
        self._call("get_tensor_shape", name)
        spec = self.world.spec
        return spec.output_shapes(spec.dims_of(self.shapes))[name]

    def set_tensor_address(self, name, address):
        self._call("set_tensor_address", name, address)
        self.addresses[name] = address
        return True

    def is_stream_capturable(self, stream):
        return self.world.capturable

    def execute_async_v3(self, stream):
        world = self.world
        self._call("execute_async_v3", stream, world.capturing is not None)
        # TensorRT enqueues on the stream it is given: the engine must pass torch's current one
        assert stream == torch.cuda.current_stream().cuda_stream
        shape = self.shapes["input_ids"]
        out_shape = self.get_tensor_shape("text_embeddings")
        world.calls.pop()  # (that lookup is the fake's own, not the engine's)
        ids_at, mask_at, out_at = (self.addresses[n] for n in ("input_ids", "attention_mask", "text_embeddings"))

        def kernel():
            ids = tensor_at(ids_at, shape, torch.int64, world.device)
            mask = tensor_at(mask_at, shape, torch.int64, world.device)
            out = tensor_at(out_at, out_shape, torch.float32, world.device)
            out.copy_((ids.float() + 0.5 * mask.float())[..., None].expand(out_shape))

        if world.capturing is not None:  # a fake CUDA graph records the launch
            world.capturing.kernels.append(kernel)
        else:  # eager, or a real CUDA graph capturing torch's kernels
            kernel()
        return True


class FakeCuda:
    """torch.cuda's streams and graphs for the CPU: streams with handles, a current
    stream, graphs that record the fake engine's launches and replay them."""

    def __init__(self, world: FakeWorld, fail_capture: bool = False):
        self.world, self.fail_capture = world, fail_capture
        self.events: list[tuple] = []
        fake = self

        class Stream:
            handles = iter(range(1000, 2000))

            def __init__(self, device=None):
                self.cuda_stream = next(Stream.handles)

            def wait_stream(self, other):
                fake.events.append(("wait_stream", self.cuda_stream, other.cuda_stream))

            def synchronize(self):
                fake.events.append(("synchronize", self.cuda_stream))

        class CUDAGraph:
            def __init__(self):
                self.kernels = []

            def replay(self):
                fake.events.append(("replay", torch.cuda.current_stream().cuda_stream))
                for k in self.kernels:
                    k()

        class graph:
            def __init__(self, cuda_graph, pool=None, stream=None, **_):
                self.g, self.s = cuda_graph, stream

            def __enter__(self):
                fake.events.append(("capture", self.s.cuda_stream))
                world.capturing, self.previous, fake.current = self.g, fake.current, self.s

            def __exit__(self, *exc):
                world.capturing, fake.current = None, self.previous
                if fake.fail_capture:
                    raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
                return False

        self.Stream, self.CUDAGraph, self.graph = Stream, CUDAGraph, graph
        self.default = Stream()
        self.current = self.default

    def current_stream(self, device=None):
        return self.current

    @contextmanager
    def stream(self, s):
        previous, self.current = self.current, s
        try:
            yield
        finally:
            self.current = previous

    def install(self, monkeypatch) -> None:
        for name in ("Stream", "CUDAGraph", "graph", "current_stream", "stream"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))


@pytest.fixture
def fake_spec():
    return widen(text_encoder_spec(from_preset("tiny")), PROFILES)


@pytest.fixture
def fake_world(tmp_path, fake_spec, monkeypatch):
    """A fake tensorrt_rtx and torch.cuda, and an engine directory of the fake plan."""
    world = FakeWorld(fake_spec, b"fake text encoder plan")
    mod = world.module()
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", mod)
    world.cuda = FakeCuda(world)
    world.cuda.install(monkeypatch)
    world.dir = write_engine_dir(tmp_path / "text_encoder", fake_spec, world.plan, backend="rtx",
                                 versions={"tensorrt_rtx": mod.__version__})
    return world


def feeds_at(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 512, size=(batch, 16)),
            "attention_mask": (rng.random((batch, 16)) < 0.7).astype(np.int64)}


def test_calls_follow_the_tensorrt_protocol(fake_world):
    world = fake_world
    pool = DeviceMemoryPool("cpu")
    engine = TrtEngine(world.dir, text_encoder_spec(from_preset("tiny")), pool=pool)
    assert world.calls == [("deserialize_cuda_engine",)] and pool.size == 4096
    world.calls.clear()
    stream = pool.stream.cuda_stream
    engine.prepare(shapes_at(5))
    state = engine._states[((5, 16), (5, 16))]
    ptr = {name: buf.data_ptr() for name, buf in state.buffers.items()}
    assert world.calls == [
        ("create_execution_context", "USER_MANAGED"),
        ("set_device_memory", pool.pointer, 4096),
        ("set_optimization_profile_async", 1, stream),  # batch 5 lies in the second profile
        ("set_input_shape", "input_ids", (5, 16)), ("set_input_shape", "attention_mask", (5, 16)),
        ("update_device_memory_size_for_shapes",), ("set_device_memory", pool.pointer, 4096),
        ("infer_shapes",), ("get_tensor_shape", "text_embeddings"),
        ("set_tensor_address", "input_ids", ptr["input_ids"]),
        ("set_tensor_address", "attention_mask", ptr["attention_mask"]),
        ("set_tensor_address", "text_embeddings", ptr["text_embeddings"])]
    # buffers: views of the profile's max-shape buffers, in the graph's dtypes
    assert state.buffers["text_embeddings"].shape == (5, 16, 32) and state.buffers["input_ids"].dtype == torch.int64
    assert engine._buffers[1]["text_embeddings"].numel() == 8 * 16 * 32
    world.calls.clear()
    feeds = feeds_at(5)
    out = engine.run(feeds)
    assert world.calls == [("execute_async_v3", stream, False)]
    np.testing.assert_array_equal(out["text_embeddings"].numpy(), expected_embeddings(**feeds))
    assert out["text_embeddings"].data_ptr() == ptr["text_embeddings"]  # a view of the engine's buffer
    # the engine's stream waits for the caller's before the copies, the caller's for it after
    assert world.cuda.events[-2:] == [("wait_stream", stream, world.cuda.default.cuda_stream),
                                      ("wait_stream", world.cuda.default.cuda_stream, stream)]
    # another profile: its own context; back to batch 5: nothing to set again
    world.calls.clear()
    feeds1 = feeds_at(1, seed=1)
    np.testing.assert_array_equal(engine.run(feeds1)["text_embeddings"].numpy(), expected_embeddings(**feeds1))
    assert world.calls[:3] == [("create_execution_context", "USER_MANAGED"), ("set_device_memory", pool.pointer, 4096),
                               ("set_optimization_profile_async", 0, stream)]
    world.calls.clear()
    engine.run(feeds)
    assert world.calls == [("execute_async_v3", stream, False)]
    # another shape of the first profile's context: shapes and addresses again, same context and profile
    world.calls.clear()
    feeds6 = {k: torch.from_numpy(v) for k, v in feeds_at(6, seed=2).items()}  # torch tensors too
    np.testing.assert_array_equal(engine.run(feeds6)["text_embeddings"].numpy(), expected_embeddings(**feeds6))
    names = [c[0] for c in world.calls]
    assert "create_execution_context" not in names and "set_optimization_profile_async" not in names
    assert names[:2] == ["set_input_shape", "set_input_shape"] and names[-1] == "execute_async_v3"
    with pytest.raises(ShapeError, match=r"\(2, 6\)"):
        engine.prepare(shapes_at(3))
    engine.close()
    assert pool.size == 0  # its last user left
    with pytest.raises(EngineError, match="closed"):
        engine.run(feeds)


def test_cuda_graph_is_captured_and_replayed(fake_world, caplog):
    world = fake_world
    pool = DeviceMemoryPool("cpu")
    engine = TrtEngine(world.dir, world.spec, pool=pool)
    stream = pool.stream.cuda_stream
    world.calls.clear()
    with caplog.at_level(logging.WARNING):
        engine.prepare(shapes_at(2), cuda_graph=True)
    assert not caplog.records
    launches = [c for c in world.calls if c[0] == "execute_async_v3"]
    assert launches == [("execute_async_v3", stream, False), ("execute_async_v3", stream, True)]  # warm-up, capture
    assert world.calls.index(("set_optimization_profile_async", 0, stream)) < world.calls.index(launches[0])
    world.calls.clear()
    for seed in (3, 4):  # new inputs copied into the captured buffers each time
        feeds = feeds_at(2, seed)
        out = engine.run(feeds)
        np.testing.assert_array_equal(out["text_embeddings"].numpy(), expected_embeddings(**feeds))
    assert world.calls == []  # replayed, not launched
    assert [e for e in world.cuda.events if e[0] in ("capture", "replay")] == [
        ("capture", stream), ("replay", stream), ("replay", stream)]
    # another engine on the pool asks for more memory: the block moves, so the graph is captured again
    world.calls.clear()
    world.memory = 1 << 20
    other = TrtEngine(world.dir, world.spec, pool=pool)
    assert pool.size == 1 << 20
    feeds = feeds_at(2, 5)
    np.testing.assert_array_equal(engine.run(feeds)["text_embeddings"].numpy(), expected_embeddings(**feeds))
    assert ("set_device_memory", pool.pointer, 1 << 20) in world.calls
    assert [c[2] for c in world.calls if c[0] == "execute_async_v3"] == [False, True]
    engine.close()
    assert pool.size == 1 << 20  # still in use by the other engine
    other.close()
    assert pool.size == 0


@pytest.mark.parametrize("failure", ["capture raises", "not capturable"])
def test_failed_capture_runs_eagerly_with_one_log_line(fake_world, caplog, failure):
    world = fake_world
    if failure == "capture raises":
        world.cuda.fail_capture = True
    else:
        world.capturable = False
    engine = TrtEngine(world.dir, world.spec, pool=DeviceMemoryPool("cpu"))
    with caplog.at_level(logging.WARNING, logger="easyanimate_rt"):
        engine.prepare(shapes_at(4), cuda_graph=True)
    assert len(caplog.records) == 1
    assert "CUDA graph capture failed" in caplog.records[0].getMessage()
    assert "\n" not in caplog.records[0].getMessage()
    world.calls.clear()
    feeds = feeds_at(4, 7)
    np.testing.assert_array_equal(engine.run(feeds)["text_embeddings"].numpy(), expected_embeddings(**feeds))
    assert world.calls == [("execute_async_v3", engine.pool.stream.cuda_stream, False)]  # eager
    engine.close()


def test_a_plan_that_does_not_deserialize_or_differs_is_an_engine_error(fake_world, tmp_path):
    world = fake_world
    bad = write_engine_dir(tmp_path / "bad", world.spec, b"another plan", backend="rtx",
                           versions={"tensorrt_rtx": "9.9.9-fake"})
    with pytest.raises(EngineError, match="could not deserialize"):
        TrtEngine(bad, world.spec, pool=DeviceMemoryPool("cpu"))
    one_profile = widen(world.spec, PROFILES[:1])
    world_dir = write_engine_dir(tmp_path / "one", one_profile, world.plan, backend="rtx",
                                 versions={"tensorrt_rtx": "9.9.9-fake"})
    with pytest.raises(EngineError, match="2 optimisation profiles, its manifest 1"):
        TrtEngine(world_dir, world.spec, pool=DeviceMemoryPool("cpu"))


def test_missing_tensorrt_names_the_extra(monkeypatch, fake_spec, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    for backend, extra in (("trt", "trt"), ("rtx", "rtx")):
        with pytest.raises(MissingDependencyError, match=rf'easyanimate-rt\[{extra}\]') as info:
            import_backend(backend)
        assert info.value.extra == extra
    d = write_engine_dir(tmp_path / "te", fake_spec, b"plan", backend="rtx", versions={"tensorrt_rtx": "1"})
    with pytest.raises(MissingDependencyError, match=r"easyanimate-rt\[rtx\]"):
        TrtEngine(d, fake_spec, pool=DeviceMemoryPool("cpu"))


# --- the fake TensorRT on a real GPU: torch streams and CUDA graphs ---------------------------


@pytest.mark.gpu
def test_cuda_graph_around_the_launch_on_a_gpu(tmp_path, fake_spec, monkeypatch, caplog):
    """Everything but TensorRT itself on a GPU: the pool's CUDA block and stream, buffers,
    a real torch CUDA graph around the fake engine's launch (which enqueues torch kernels
    on the stream it is given), replay with fresh inputs, and the eager fallback."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    world = FakeWorld(fake_spec, b"fake text encoder plan", device="cuda")
    mod = world.module()
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", mod)
    d = write_engine_dir(tmp_path / "te", fake_spec, world.plan, backend="rtx",
                         versions={"tensorrt_rtx": mod.__version__})
    pool = DeviceMemoryPool("cuda")
    engine = TrtEngine(d, fake_spec, pool=pool)
    with caplog.at_level(logging.WARNING, logger="easyanimate_rt"):
        engine.prepare(shapes_at(6), cuda_graph=True)
    assert not caplog.records and engine._states[((6, 16), (6, 16))].graph is not None
    world.calls.clear()
    for seed in range(3):
        feeds = {k: torch.from_numpy(v).cuda() for k, v in feeds_at(6, seed).items()}
        out = engine.run(feeds)["text_embeddings"]
        assert out.is_cuda
        np.testing.assert_array_equal(out.cpu().numpy(), expected_embeddings(*(v.cpu() for v in feeds.values())))
    assert world.calls == []  # replays only
    world.capturable = False
    with caplog.at_level(logging.WARNING, logger="easyanimate_rt"):
        engine.prepare(shapes_at(1), cuda_graph=True)
    assert len(caplog.records) == 1
    feeds = feeds_at(1, 9)
    np.testing.assert_array_equal(engine.run(feeds)["text_embeddings"].cpu().numpy(), expected_embeddings(**feeds))
    engine.close()
    assert pool.size == 0


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_tensorrt_engine_matches_onnxruntime(exports, tmp_path):
    """The real thing where datacenter TensorRT and a GPU exist: TrtEngine on a plan
    built for the local GPU agrees with ONNX Runtime on the CPU."""
    trt = pytest.importorskip("tensorrt", reason="datacenter TensorRT is not installable here (its wheels are stubs)")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from exported import ort_session

    from easyanimate_rt.engines.tensorrt import build_plan, local_gpu
    from easyanimate_rt.tolerances import error_stats, within

    spec, onnx_path = exports.written("tiny", "text_encoder")
    built_spec = widen(spec, PROFILES)
    built = build_plan(trt, onnx_path, [built_spec.profile_shapes(p) for p in PROFILES])
    d = write_engine_dir(tmp_path / "te", built_spec, built.plan, backend="trt", versions={"tensorrt": trt.__version__},
                         onnx_path=onnx_path, io=built.io, device_memory=built.device_memory)
    manifest = Manifest.load(d)
    manifest.target = local_gpu()
    manifest.save(d)
    assert len(built.device_memory) == 2
    engine = TrtEngine(d, spec, onnx_path)
    session = ort_session(onnx_path)
    for batch in (1, 2, 5):
        feeds = spec.random_inputs({"batch": batch}, seed=batch)
        for graphed in (False, True):
            engine.prepare({k: v.shape for k, v in feeds.items()}, cuda_graph=graphed)
            got = engine.run(feeds)["text_embeddings"].float().cpu().numpy()
            assert within(error_stats(got, session.run(None, feeds)[0]), "trt_fp16")  # TF32 is on by default
    engine.close()
