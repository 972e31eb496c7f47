"""OrtEngine (runtime/backends/ort.py) on the CPU and on ONNX Runtime's GPU providers,
where no GPU provider can run (DESIGN.md 5):

- ``ort-cpu``: numpy through ``session.run``, bit for bit what a plain session gives, and
  no torch import on that path;
- ``ort-cuda`` / ``ort-trt`` against a fake ONNX Runtime (a session, IOBinding and
  RunOptions that record their calls and compute a known function of the bound inputs)
  and a fake "CUDA" whose buffers are CPU torch tensors: one binding per prepared shape
  with the right names, dtypes, shapes and pointers, feeds copied into the same buffers
  on every run, CUDA graph ids per shape, the eager fallback with one log line, the
  session's provider options, and the error for an onnxruntime without the provider;
- on a GPU (marker ``gpu``): the same fake session with real torch streams, and the real
  thing where onnxruntime-gpu is installed.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from easyanimate_rt.engines import onnxruntime as ortb
from easyanimate_rt.engines.build import current_environment
from easyanimate_rt.engines.manifest import Manifest
from easyanimate_rt.errors import EngineError, MissingDependencyError
from easyanimate_rt.fileio import sha256_files
from easyanimate_rt.runtime.backends import ort as ort_backend
from easyanimate_rt.runtime.backends.ort import OrtEngine

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STREAM = 7777  # the fake device's cudaStream_t


def engine_dir(directory: Path, spec, onnx_path: Path, backend: str = "ort-cpu") -> Path:
    """One network's engine directory as ``build`` installs it (artefact and manifest; the
    parity gate is the builder's business). A GPU backend's artefact is the graph itself."""
    directory.mkdir(parents=True)
    if backend == "ort-cpu" or backend in _runnable_gpu_backends():
        out = ortb.build(onnx_path, directory, backend, threads=1)
        versions, target = current_environment(backend)
    else:
        shutil.copy2(onnx_path, directory / onnx_path.name)
        out = {"artifact": onnx_path.name, "flags": {"provider": ortb.PROVIDERS[backend]}}
        versions = {"onnxruntime": ortb.version()}
        target = {"kind": "gpu", "name": "NVIDIA H200", "compute_capability": "SM90"}
    path = directory / out["artifact"]
    Manifest(key=spec.key, backend=backend, precision=spec.precision.name, onnx_sha256=sha256_files([onnx_path]),
             spec_sha256="0" * 64, buckets={p.name: i for i, p in enumerate(spec.profiles)},
             profiles=[{"name": p.name, "dims": {k: list(v) for k, v in p.dims.items()},
                        "shapes": {k: [list(s) for s in v] for k, v in spec.profile_shapes(p).items()}}
                       for p in spec.profiles],
             flags=out["flags"], versions=versions, target=target,
             artifact={"file": out["artifact"], "bytes": path.stat().st_size, "sha256": sha256_files([path])},
             build_seconds=0.0).save(directory)
    return directory


def _runnable_gpu_backends() -> list[str]:
    import onnxruntime as ort

    if not torch.cuda.is_available():
        return []
    return [b for b in ("ort-cuda", "ort-trt") if ortb.PROVIDERS[b] in ort.get_available_providers()]


def shapes_at(spec, batch: int) -> dict[str, tuple[int, ...]]:
    return spec.input_shapes({"batch": batch})


@pytest.fixture(scope="module")
def text_encoder(exports):
    """(spec, model.onnx) of the tiny T5: int64 inputs, a float32 output, batch 1..8."""
    return exports.written("tiny", "text_encoder")


# --- ort-cpu: unchanged --------------------------------------------------------------------------


def test_cpu_engine_is_session_run_on_numpy_bit_for_bit(text_encoder, tmp_path):
    spec, onnx_path = text_encoder
    directory = engine_dir(tmp_path / "text_encoder", spec, onnx_path)
    engine = OrtEngine(directory, spec, onnx_path, threads=1)
    assert engine.session.get_providers() == ["CPUExecutionProvider"] and engine._device is None
    plain = ortb.load(directory, ortb.OPTIMIZED_NAME, "ort-cpu", threads=1)  # what run() did before GPU engines
    for batch, seed in ((2, 0), (1, 1), (5, 2)):
        feeds = spec.random_inputs({"batch": batch}, seed)
        feeds["attention_mask"] = feeds["attention_mask"].astype(np.float32)  # run() casts to the graph's int64
        engine.prepare({k: v.shape for k, v in feeds.items()}, cuda_graph=True)  # nothing to capture on the CPU
        out = engine.run(feeds)
        want = plain.run(None, {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype) for t in spec.inputs})[0]
        assert list(out) == ["text_embeddings"] and isinstance(out["text_embeddings"], np.ndarray)
        assert out["text_embeddings"].shape == (batch, 16, spec.outputs[0].shape[-1]) and np.abs(want).max() > 0
        np.testing.assert_array_equal(out["text_embeddings"], want)


def test_cpu_engine_needs_no_torch(text_encoder, tmp_path):
    """DESIGN.md 4: the CPU path reaches its engines without importing torch."""
    spec, onnx_path = text_encoder
    directory = engine_dir(tmp_path / "text_encoder", spec, onnx_path)
    code = f"""
import sys
from easyanimate_rt.export.spec import ExportSpec
from easyanimate_rt.runtime.backends.ort import OrtEngine
spec = ExportSpec.load({str(onnx_path.parent / 'spec.json')!r})
engine = OrtEngine({str(directory)!r}, spec, threads=1)
engine.prepare(spec.input_shapes(spec.sample))
out = engine.run(spec.sample_inputs())
assert out["text_embeddings"].shape[0] == 2
assert "torch" not in sys.modules, "the ort-cpu path imported torch"
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- GPU providers against a fake ONNX Runtime ----------------------------------------------------


class CpuCuda(ort_backend._CudaBuffers):
    """The engine's "CUDA": CPU torch tensors, a stream that is a number; records the
    buffers (by pointer, for the fake session) and how each run synchronised."""

    last: CpuCuda

    def __init__(self, device_id: int):
        self.torch, self.device, self.stream = torch, torch.device("cpu"), STREAM
        self.tensors: dict[int, torch.Tensor] = {}
        self.waits: list[bool] = []
        self.handed_back = 0
        CpuCuda.last = self

    def empty(self, shape, dtype):
        t = super().empty(shape, dtype)
        self.tensors[t.data_ptr()] = t
        return t

    @contextlib.contextmanager
    def _on_stream(self, wait):
        self.waits.append(wait)
        yield

    def hand_back(self):
        self.handed_back += 1


class FakeRunOptions:
    def __init__(self):
        self.entries: dict[str, str] = {}

    def add_run_config_entry(self, key, value):
        self.entries[key] = value


class FakeBinding:
    def __init__(self):
        self.calls: list[tuple] = []

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        self.calls.append(("input", name, device_type, device_id, element_type, tuple(shape), buffer_ptr))

    def bind_output(self, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None):
        self.calls.append(("output", name, device_type, device_id, element_type, tuple(shape), buffer_ptr))

    def pointers(self) -> dict[str, int]:
        return {c[1]: c[6] for c in self.calls}


def expected(ids, mask, width: int) -> torch.Tensor:
    """The fake graph: text_embeddings[b, s, :] = ids * mask + 0.5."""
    x = torch.as_tensor(np.asarray(ids)).long() * torch.as_tensor(np.asarray(mask)).long()
    return (x.float() + 0.5)[..., None].expand(*x.shape, width)


def fake_ort(*, graphs: bool = True, takes_stream: bool = True, refuse_graphs: bool | str = False,
             fail_capture: bool = False, starts: str | None = None,
             available=("CUDAExecutionProvider", "TensorrtExecutionProvider")):
    """A stand-in for the onnxruntime module: its SessionOptions are real, its sessions fake.
    ``graphs``: sessions report ``enable_cuda_graph`` as asked; ``takes_stream``: they report
    the ``user_compute_stream`` given; ``refuse_graphs``: creating one with CUDA graphs fails
    as ONNX Runtime does for a graph it cannot capture (``"fallback"``: it starts on the
    CPU instead, as a session that prints and falls back does); ``fail_capture``: a run that names a
    CUDA graph fails; ``starts``: the provider the session really runs on (a silent
    fallback), default the first asked for."""
    import onnxruntime as real

    sessions: list = []

    class FakeSession:
        def __init__(self, path, opts, providers=None, enable_fallback=1):
            self.path, self.opts, self.asked, self.enable_fallback = path, opts, providers, enable_fallback
            name, options = providers[0]
            if refuse_graphs == "fallback" and options.get("enable_cuda_graph") == "1":
                starts_on = "CPUExecutionProvider"  # an onnxruntime whose session prints and falls back
            elif refuse_graphs and options.get("enable_cuda_graph") == "1":
                raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : This session cannot use the graph capture feature "
                                   "as requested by the user as all compute graph nodes have not been partitioned "
                                   "to the CUDAExecutionProvider")
            else:
                starts_on = starts or name
            self.provider = starts_on
            self.options = dict(options)
            if not graphs:
                self.options["enable_cuda_graph"] = "0"
            if not takes_stream:
                self.options.pop("user_compute_stream", None)
            self.bindings: list[FakeBinding] = []
            self.runs: list[tuple[FakeBinding, dict]] = []
            self.fallback = True
            sessions.append(self)

        def get_providers(self):
            return [self.provider, "CPUExecutionProvider"]

        def get_provider_options(self):
            return {self.provider: self.options, "CPUExecutionProvider": {}}

        def disable_fallback(self):
            self.fallback = False

        def io_binding(self):
            self.bindings.append(FakeBinding())
            return self.bindings[-1]

        def run_with_iobinding(self, binding, run_options=None):
            self.runs.append((binding, dict(run_options.entries)))
            if fail_capture and run_options.entries.get(ortb.GRAPH_ID, "-1") != "-1":
                raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA failure 900:\n"
                                   "operation not permitted when stream is capturing")
            ptr = binding.pointers()
            buffers = CpuCuda.last.tensors
            out = buffers[ptr["text_embeddings"]]
            out.copy_(expected(buffers[ptr["input_ids"]].cpu(), buffers[ptr["attention_mask"]].cpu(), out.shape[-1]))

    module = types.SimpleNamespace(
        __version__=real.__version__, SessionOptions=real.SessionOptions,
        GraphOptimizationLevel=real.GraphOptimizationLevel, InferenceSession=FakeSession, RunOptions=FakeRunOptions,
        get_available_providers=lambda: [*available, "CPUExecutionProvider"])
    module.sessions = sessions
    return module


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install a fake onnxruntime (``fake_gpu(**kwargs)``, see fake_ort) and the CPU "CUDA";
    the manifest's GPU target is build.check_network's business, not checked here."""

    def install(**kwargs):
        module = fake_ort(**kwargs)
        monkeypatch.setattr(ortb, "import_ort", lambda: module)
        return module

    monkeypatch.setattr(ort_backend, "_CudaBuffers", CpuCuda)
    monkeypatch.setattr(ort_backend, "check_network", lambda directory, onnx_path=None: Manifest.load(directory))
    return install


@pytest.fixture(scope="module")
def cuda_dir(text_encoder, tmp_path_factory):
    spec, onnx_path = text_encoder
    return engine_dir(tmp_path_factory.mktemp("ort-cuda") / "text_encoder", spec, onnx_path, "ort-cuda")


@pytest.fixture(scope="module")
def trt_dir(text_encoder, tmp_path_factory):
    spec, onnx_path = text_encoder
    return engine_dir(tmp_path_factory.mktemp("ort-trt") / "text_encoder", spec, onnx_path, "ort-trt")


def feeds_at(spec, batch: int, seed: int, as_torch: bool = False) -> dict:
    feeds = spec.random_inputs({"batch": batch}, seed)
    feeds["attention_mask"] = feeds["attention_mask"].astype(np.float32)  # copied into the int64 buffer
    return {k: torch.from_numpy(v) for k, v in feeds.items()} if as_torch else feeds


def test_gpu_engine_binds_each_shape_once_and_copies_feeds_into_the_same_buffers(text_encoder, cuda_dir, fake_gpu):
    spec, onnx_path = text_encoder
    ort = fake_gpu()
    engine = OrtEngine(cuda_dir, spec, onnx_path, threads=1, device_id=1)
    (session,) = ort.sessions
    assert session is engine.session and session.path == str(cuda_dir / onnx_path.name)
    # the CUDA provider on device 1 and the engine's stream, CUDA graphs on; no silent CPU fallback
    assert session.asked == [("CUDAExecutionProvider", {"device_id": "1", "user_compute_stream": str(STREAM),
                                                        "enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    assert session.enable_fallback == 0 and not session.fallback

    width = spec.outputs[0].shape[-1]
    engine.prepare(shapes_at(spec, 2))
    (binding,) = session.bindings
    buffers = CpuCuda.last.tensors
    ids, mask, out = (buffers[binding.pointers()[n]] for n in ("input_ids", "attention_mask", "text_embeddings"))
    assert binding.calls == [
        ("input", "input_ids", "cuda", 1, np.int64, (2, 16), ids.data_ptr()),
        ("input", "attention_mask", "cuda", 1, np.int64, (2, 16), mask.data_ptr()),
        ("output", "text_embeddings", "cuda", 1, np.float32, (2, 16, width), out.data_ptr())]
    assert (ids.dtype, mask.dtype, out.dtype, tuple(out.shape)) == (torch.int64, torch.int64, torch.float32,
                                                                    (2, 16, width))

    first = feeds_at(spec, 2, seed=0)
    result = engine.run(first)
    assert list(result) == ["text_embeddings"] and result["text_embeddings"] is out  # the bound buffer itself
    torch.testing.assert_close(result["text_embeddings"], expected(first["input_ids"], first["attention_mask"], width))
    second = feeds_at(spec, 2, seed=1, as_torch=True)  # device tensors are copied the same way
    again = engine.run(second)
    assert again["text_embeddings"] is out and len(session.bindings) == 1 and len(binding.calls) == 3
    torch.testing.assert_close(out, expected(second["input_ids"], second["attention_mask"], width))
    torch.testing.assert_close(ids, second["input_ids"])  # copied into the bound input, not rebound
    assert not torch.equal(out, expected(first["input_ids"], first["attention_mask"], width))

    # a new shape, unprepared: bound now (eager), once; the old shape keeps its buffers
    one = feeds_at(spec, 1, seed=2)
    small = engine.run(one)["text_embeddings"]
    assert len(session.bindings) == 2 and small.shape == (1, 16, width) and small is not out
    assert [c[5] for c in session.bindings[1].calls] == [(1, 16), (1, 16), (1, 16, width)]
    torch.testing.assert_close(small, expected(one["input_ids"], one["attention_mask"], width))
    assert engine.run(first)["text_embeddings"] is out and len(session.bindings) == 2
    assert [r[0] for r in session.runs] == [binding, binding, session.bindings[1], binding]
    # eager runs on a CUDA-graph session say so; the caller's stream waits on the engine's, not the host
    assert all(r[1] == {ortb.GRAPH_ID: "-1", ortb.NO_SYNC: "1"} for r in session.runs)
    assert CpuCuda.last.waits == [False] * 4 and CpuCuda.last.handed_back == 4


def test_cuda_graphs_get_one_graph_id_per_prepared_shape(text_encoder, cuda_dir, fake_gpu, caplog):
    spec, onnx_path = text_encoder
    ort = fake_gpu()
    engine = OrtEngine(cuda_dir, spec, onnx_path)
    session = ort.sessions[0]
    with caplog.at_level(logging.INFO, logger=ort_backend.__name__):
        engine.prepare(shapes_at(spec, 2), cuda_graph=True)
        engine.prepare(shapes_at(spec, 1), cuda_graph=True)
    assert not caplog.records  # the session has CUDA graphs: nothing to say

    def run(batch, seed):
        engine.run(feeds_at(spec, batch, seed))
        return session.runs[-1]

    b2, b1 = session.bindings
    assert run(2, 0) == (b2, {ortb.GRAPH_ID: "1", ortb.NO_SYNC: "1"})
    assert run(2, 1) == (b2, {ortb.GRAPH_ID: "1", ortb.NO_SYNC: "1"})  # replay: the same addresses
    assert run(1, 2) == (b1, {ortb.GRAPH_ID: "2", ortb.NO_SYNC: "1"})
    engine.prepare(shapes_at(spec, 2), cuda_graph=True)  # again: same graph, no rebinding
    assert run(2, 3) == (b2, {ortb.GRAPH_ID: "1", ortb.NO_SYNC: "1"}) and len(session.bindings) == 2
    engine.prepare(shapes_at(spec, 2))  # eager again on the same buffers
    assert run(2, 4) == (b2, {ortb.GRAPH_ID: "-1", ortb.NO_SYNC: "1"})
    engine.prepare(shapes_at(spec, 2), cuda_graph=True)  # and back to its graph
    assert run(2, 5)[1][ortb.GRAPH_ID] == "1"
    engine.prepare(shapes_at(spec, 4), cuda_graph=True)
    assert run(4, 6)[1][ortb.GRAPH_ID] == "3"
    assert b2.calls == session.bindings[0].calls and len(b2.calls) == 3  # bound once, whatever the mode


def test_a_failed_capture_runs_every_shape_eager_from_then_on(text_encoder, cuda_dir, fake_gpu, caplog):
    spec, onnx_path = text_encoder
    fake_gpu(fail_capture=True)
    engine = OrtEngine(cuda_dir, spec, onnx_path)
    session = engine.session
    engine.prepare(shapes_at(spec, 1), cuda_graph=True)
    engine.prepare(shapes_at(spec, 2), cuda_graph=True)
    feeds = feeds_at(spec, 2, seed=0)
    with caplog.at_level(logging.INFO, logger=ort_backend.__name__):
        out = engine.run(feeds)["text_embeddings"]  # fails in capture, runs again eager
        engine.prepare(shapes_at(spec, 4), cuda_graph=True)
        engine.run(feeds_at(spec, 4, seed=1))
        engine.run(feeds_at(spec, 1, seed=2))
    (line,) = caplog.records
    assert line.levelno == logging.WARNING and line.getMessage() == (
        "text_encoder: CUDA graph capture failed (operation not permitted when stream is capturing); running eager")
    torch.testing.assert_close(out, expected(feeds["input_ids"], feeds["attention_mask"], out.shape[-1]))
    b1, b2, b4 = session.bindings
    assert [(r[0], r[1][ortb.GRAPH_ID]) for r in session.runs] == [(b2, "2"), (b2, "-1"), (b4, "-1"), (b1, "-1")]


@pytest.mark.parametrize("refusal", [True, "fallback"])
def test_a_session_without_cuda_graphs_runs_eager_with_one_log_line(text_encoder, cuda_dir, fake_gpu, caplog, refusal):
    spec, onnx_path = text_encoder
    ort = fake_gpu(refuse_graphs=refusal)  # ONNX Runtime cannot capture this graph
    with caplog.at_level(logging.INFO):
        engine = OrtEngine(cuda_dir, spec, onnx_path)
        session = engine.session
        assert session.asked[0][1]["enable_cuda_graph"] == "0"  # created again without CUDA graphs
        assert [r.name for r in caplog.records] == [ortb.__name__]
        why = ("all compute graph nodes have not been partitioned to the CUDAExecutionProvider" if refusal is True
               else "the session fell back to CPUExecutionProvider")
        message = caplog.records[0].getMessage()
        assert "ONNX Runtime refused a session with CUDA graphs (" in message
        assert message.endswith(f"{why}); loading it without them")
        caplog.clear()
        for batch in (2, 1, 2):
            engine.prepare(shapes_at(spec, batch), cuda_graph=True)
            engine.run(feeds_at(spec, batch, seed=batch))
    assert ort.sessions[-1] is session and len(ort.sessions) == (1 if refusal is True else 2)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == "text_encoder: the CUDAExecutionProvider session was not created with CUDA graphs; running eager"
    assert [r[1] for r in session.runs] == [{ortb.NO_SYNC: "1"}] * 3  # no graph id on a session without graphs


def test_ort_trt_passes_the_build_profiles_and_runs_eager(text_encoder, trt_dir, fake_gpu, caplog):
    spec, onnx_path = text_encoder
    ort = fake_gpu(takes_stream=False)  # a provider that ignores user_compute_stream
    engine = OrtEngine(trt_dir, spec, onnx_path, device_id=0)
    (session,) = ort.sessions
    (trt, trt_options), (cuda, cuda_options), cpu = session.asked
    assert (trt, cuda, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert trt_options["trt_profile_min_shapes"] == "input_ids:1x16,attention_mask:1x16"  # as build gave them
    assert trt_options["trt_profile_max_shapes"] == "input_ids:8x16,attention_mask:8x16"
    assert trt_options["trt_engine_cache_path"] == str(trt_dir / "trt_cache")
    assert trt_options["device_id"] == cuda_options["device_id"] == "0"
    assert trt_options["user_compute_stream"] == cuda_options["user_compute_stream"] == str(STREAM)
    with caplog.at_level(logging.INFO, logger=ort_backend.__name__):
        engine.prepare(shapes_at(spec, 3), cuda_graph=True)
        result = engine.run(feeds_at(spec, 3, seed=0, as_torch=True))["text_embeddings"]
    assert len(caplog.records) == 1 and "TensorrtExecutionProvider session was not created with CUDA graphs" in \
        caplog.records[0].getMessage()
    assert result.shape == (3, 16, spec.outputs[0].shape[-1])
    # its own stream: the copies are waited for on the host, and ONNX Runtime synchronises at the end of Run
    assert session.runs[-1][1] == {} and CpuCuda.last.waits == [True]


def test_a_session_that_fell_back_to_the_cpu_is_an_error(text_encoder, cuda_dir, fake_gpu):
    spec, onnx_path = text_encoder
    fake_gpu(starts="CPUExecutionProvider")  # what ONNX Runtime's Python session does when CUDA fails to start
    with pytest.raises(EngineError, match=r"did not start CUDAExecutionProvider .* runs on \['CPUExecutionProvider'"):
        OrtEngine(cuda_dir, spec, onnx_path)


def test_ort_cuda_builds_record_whether_they_have_cuda_graphs(text_encoder, tmp_path, fake_gpu):
    _, onnx_path = text_encoder
    fake_gpu(refuse_graphs=True)
    out = ortb.build(onnx_path, tmp_path, "ort-cuda", threads=1)
    assert out["artifact"] == onnx_path.name and out["flags"]["cuda_graph"] is False
    fake_gpu()
    (tmp_path / "again").mkdir()
    assert ortb.build(onnx_path, tmp_path / "again", "ort-cuda", threads=1)["flags"]["cuda_graph"] is True


# --- an onnxruntime without the provider ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["ort-cuda", "ort-trt"])
def test_missing_provider_says_to_install_onnxruntime_gpu_before_any_work(text_encoder, tmp_path, backend,
                                                                         monkeypatch):
    import onnxruntime

    if ortb.PROVIDERS[backend] in onnxruntime.get_available_providers():
        pytest.skip(f"this onnxruntime has {ortb.PROVIDERS[backend]}")
    spec, onnx_path = text_encoder
    directory = engine_dir(tmp_path / "text_encoder", spec, onnx_path, backend)

    def no_work(*args, **kwargs):
        raise AssertionError("work done before the provider check")

    monkeypatch.setattr(ort_backend, "check_network", no_work)
    monkeypatch.setattr(ort_backend, "_CudaBuffers", no_work)
    with pytest.raises(MissingDependencyError) as info:
        OrtEngine(directory, spec, onnx_path)
    message = str(info.value)
    assert info.value.package == "onnxruntime-gpu" and isinstance(info.value, ImportError)
    assert f"backend {backend} needs ONNX Runtime's {ortb.PROVIDERS[backend]}" in message
    assert f"this onnxruntime {onnxruntime.__version__} lacks (it has " in message and "CPUExecutionProvider" in message
    assert "onnxruntime-gpu replaces onnxruntime" in message
    assert "pip uninstall -y onnxruntime && pip install onnxruntime-gpu" in message
    assert ("TensorRT" in message) == (backend == "ort-trt") and "--backend ort-cpu" in message


# --- on a GPU ---------------------------------------------------------------------------------------


@gpu
@pytest.mark.gpu
def test_the_callers_stream_waits_for_the_engine(text_encoder, cuda_dir, monkeypatch):
    """Real torch CUDA buffers and streams around the fake session, whose "kernel" runs on
    the engine's stream after a long sleep: the caller reads finished outputs without any
    host synchronisation in the engine."""
    spec, onnx_path = text_encoder
    ort = fake_ort()
    monkeypatch.setattr(ortb, "import_ort", lambda: ort)
    monkeypatch.setattr(ort_backend, "check_network", lambda directory, onnx_path=None: Manifest.load(directory))

    class RecordingCuda(ort_backend._CudaBuffers):
        def __init__(self, device_id):
            super().__init__(device_id)
            self.tensors = {}
            CpuCuda.last = self  # the fake session finds buffers here

        def empty(self, shape, dtype):
            t = super().empty(shape, dtype)
            self.tensors[t.data_ptr()] = t
            return t

    monkeypatch.setattr(ort_backend, "_CudaBuffers", RecordingCuda)
    engine = OrtEngine(cuda_dir, spec, onnx_path)
    session = engine.session
    plain_run = session.run_with_iobinding

    def on_engine_stream(binding, run_options=None):
        with torch.cuda.stream(torch.cuda.ExternalStream(CpuCuda.last.stream)):
            torch.cuda._sleep(50_000_000)  # ~tens of ms: a race would read the old outputs
            ptr = binding.pointers()
            buffers = CpuCuda.last.tensors
            x = buffers[ptr["input_ids"]] * buffers[ptr["attention_mask"]]
            out = buffers[ptr["text_embeddings"]]
            out.copy_((x.float() + 0.5)[..., None].expand_as(out))
        session.runs.append((binding, dict(run_options.entries)))

    monkeypatch.setattr(session, "run_with_iobinding", on_engine_stream)
    assert plain_run is not session.run_with_iobinding
    width = spec.outputs[0].shape[-1]
    for seed in range(3):
        feeds = {k: v.cuda() for k, v in feeds_at(spec, 2, seed, as_torch=True).items()}
        out = engine.run(feeds)["text_embeddings"]
        assert out.is_cuda
        torch.testing.assert_close(out.cpu(), expected(feeds["input_ids"].cpu(), feeds["attention_mask"].cpu(), width))


@pytest.mark.gpu
@pytest.mark.skipif(not _runnable_gpu_backends(), reason="needs onnxruntime-gpu and a CUDA device")
def test_ort_cuda_engine_matches_the_cpu_engine_eager_and_in_cuda_graphs(text_encoder, tmp_path):
    from easyanimate_rt.tolerances import check_close

    spec, onnx_path = text_encoder
    cpu = OrtEngine(engine_dir(tmp_path / "cpu", spec, onnx_path), spec, onnx_path, threads=1)
    for backend in _runnable_gpu_backends():
        engine = OrtEngine(engine_dir(tmp_path / backend, spec, onnx_path, backend), spec, onnx_path)
        for graph in (False, True):
            for batch, seed in ((2, 0), (1, 1), (2, 2)):
                feeds = spec.random_inputs({"batch": batch}, seed)
                engine.prepare({k: v.shape for k, v in feeds.items()}, cuda_graph=graph)
                out = engine.run(feeds)["text_embeddings"]
                assert out.is_cuda and out.device.index == 0
                check_close(out.cpu().numpy(), cpu.run(feeds)["text_embeddings"], "onnx_fp32")
        engine.close()
