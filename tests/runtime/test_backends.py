"""The backend registry (runtime/backends): one vocabulary from the CLI to the engine
directories, ``auto``'s choice and why it skipped the better ones, and a backend that
cannot run here refused before any work with what is missing. Only "is a GPU visible,
does a library import, which ONNX Runtime providers exist" are faked."""

from __future__ import annotations

import logging

import pytest

from easyanimate_rt.engines.manifest import BACKENDS as BUILD_BACKENDS
from easyanimate_rt.errors import InputError, MissingDependencyError
from easyanimate_rt.runtime import backends as reg
from easyanimate_rt.runtime.pipeline import parse_backend, resolve_backends


def probe(gpu=False, modules=("onnxruntime", "torch"), providers=("CPUExecutionProvider",)) -> reg.Probe:
    return reg.Probe(lambda: gpu, lambda m: m in modules, lambda: list(providers))


def test_every_build_backend_is_a_runtime_backend_and_ort_is_ort_cpu():
    for name in BUILD_BACKENDS:
        assert reg.backend(name).builder == name
    assert reg.backend("ort") is reg.backend("ort-cpu")
    assert reg.backend("torch").builder is None and reg.backend("torch-compile").builder is None
    with pytest.raises(InputError, match=r"backend must be one of \['auto', 'ort-cpu'.*got 'trt9'"):
        reg.backend("trt9")


@pytest.mark.parametrize("machine, device, want, skipped", [
    (probe(), None, "ort-cpu", ["trt: tensorrt is not installed", "ort-cuda: this onnxruntime has no "
                                "CUDAExecutionProvider", "torch: on the CPU ONNX Runtime is faster"]),
    (probe(gpu=True), None, "torch", ["trt: tensorrt is not installed",
                                      "ort-cuda: this onnxruntime has no CUDAExecutionProvider"]),
    (probe(gpu=True, providers=("CUDAExecutionProvider", "CPUExecutionProvider")), None, "ort-cuda",
     ["trt: tensorrt is not installed"]),
    (probe(gpu=True, modules=("onnxruntime", "torch", "tensorrt")), None, "trt", []),
    (probe(gpu=False, modules=("onnxruntime", "torch", "tensorrt")), None, "ort-cpu",
     ["trt: the run is on the CPU (--device cpu, or no CUDA device is visible)"]),
    (probe(gpu=True, modules=("onnxruntime", "torch", "tensorrt")), "cpu", "ort-cpu",
     ["trt: the run is on the CPU (--device cpu, or no CUDA device is visible)"]),
])
def test_auto_takes_the_best_backend_that_runs_and_says_why(machine, device, want, skipped, caplog):
    with caplog.at_level(logging.INFO, logger="easyanimate_rt.runtime.backends"):
        chosen, why = reg.choose_auto(machine, device)
    assert chosen.name == want
    assert why[:len(skipped)] == skipped
    assert all(f"skipped {line}" in caplog.text for line in why)


def test_a_backend_that_cannot_run_names_what_is_missing():
    with pytest.raises(MissingDependencyError, match=r'tensorrt is required for --backend trt \(tensorrt is not '
                                                     r'installed\); install it with pip install "easyanimate-rt\[trt\]"'):
        reg.require(reg.backend("trt"), probe(gpu=True))
    with pytest.raises(MissingDependencyError, match="needs ONNX Runtime's TensorrtExecutionProvider.*pip uninstall "
                                                     "-y onnxruntime && pip install onnxruntime-gpu"):
        reg.require(reg.backend("ort-trt"), probe(gpu=True))
    with pytest.raises(InputError, match="backend rtx runs on a CUDA GPU, but the run is on the CPU"):
        reg.require(reg.backend("rtx"), probe(modules=("tensorrt_rtx", "torch")))
    reg.require(reg.backend("ort-cpu"), probe())  # runs here: no error


def test_parse_and_resolve_use_the_registry_names(monkeypatch):
    assert parse_backend("ort") == dict.fromkeys(("text_encoder", "dit", "vae"), "ort-cpu")
    assert parse_backend("dit=trt,vae=ort") == {"text_encoder": "auto", "dit": "trt", "vae": "ort-cpu"}
    assert resolve_backends(parse_backend("auto"), "cpu", "fp32") == dict.fromkeys(("text_encoder", "dit", "vae"),
                                                                                   "ort-cpu")
    with pytest.raises(InputError, match=r"backend ort-cpu runs \['fp32', 'fp16'\]; got precision 'bf16'"):
        resolve_backends(parse_backend("ort"), "cpu", "bf16")
    # a CPU backend on a GPU run, and auto there deciding per the machine
    monkeypatch.setattr(reg, "MACHINE", probe(gpu=True))
    with pytest.raises(InputError, match="backend ort-cpu runs on the CPU, but the run is on cuda"):
        resolve_backends(parse_backend("ort"), "cuda", "fp32")
    assert resolve_backends(parse_backend("vae=torch"), "cuda", "bf16") == dict.fromkeys(
        ("text_encoder", "dit", "vae"), "torch")


def test_engine_directories_are_named_by_backend(tmp_path):
    from easyanimate_rt.engines.cache import EngineCache
    from easyanimate_rt.reference.config import from_preset
    from easyanimate_rt.runtime.engine_set import EngineSet
    from easyanimate_rt.runtime.source import ModelSource

    source = ModelSource(None, "tiny", 0, "0123456789abcdef" * 4, from_preset("tiny"))
    engines = EngineSet(source, source.config, {}, lambda: None, cache=EngineCache(tmp_path), precision="fp16")
    root = tmp_path / "models" / "tiny-0123456789abcdef"
    assert engines.directory("batched") == root / "ort-cpu-fp16-batched"  # as before the registry
    assert engines.directory("sequential", "trt") == root / "trt-fp16-sequential"
    engines.root = tmp_path / "mine"
    assert engines.directory("batched") == tmp_path / "mine" / "batched"
    assert engines.directory("batched", "ort-cuda") == tmp_path / "mine" / "ort-cuda-batched"
