"""Compare an exported graph with the torch reference on saved inputs (validation ladder
step 1 and 3, DESIGN.md 4).

Backends:

- ``ort``: ONNX Runtime, CPU (fp32, fp16 and fp8 graphs);
- ``onnx-ref``: the ONNX reference evaluator (numpy + ml_dtypes), the CPU way to
  compute a bfloat16 graph, which ONNX Runtime CPU has no kernels for;
- ``trt``: TensorRT, an engine built by ``engines.tensorrt``, where ``tensorrt`` imports
  and a CUDA GPU is present (TensorRT-RTX here only builds ahead of time: see
  ``engines.tensorrt_rtx``).

Runs go through polygraphy's ``Comparator`` (torch is a polygraphy runner too), so
``easyanimate-rt verify -v`` can also print polygraphy's own accuracy report. Every
comparison is against the float32 torch reference, with the tolerance of the graph's
precision from ``tolerances.TOLERANCES``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..engines.tensorrt import engine_loader, has_tensorrt_gpu
from ..errors import InputError, MissingDependencyError
from ..export.graphs import run_torch
from ..export.index import ExportIndex, load_export
from ..export.spec import INPUTS_NAME, ExportSpec
from ..reference.weights import load_model_or_preset
from ..tolerances import TOLERANCES, error_stats, within

log = logging.getLogger(__name__)

BACKENDS = ("ort", "onnx-ref", "trt")


def tolerance_name(spec: ExportSpec) -> str:
    """Which row of the tolerance table a graph is held to."""
    return spec.precision.tolerance


# --- inputs -------------------------------------------------------------------------------------


def load_inputs(path: str | Path, spec: ExportSpec) -> list[dict[str, np.ndarray]]:
    """Feeds from an ``.npz`` whose keys are the graph's input names; arrays of the
    inputs' rank are one iteration, arrays with one more (leading) axis a stack of them."""
    path = Path(path)
    try:
        data = np.load(path)
    except FileNotFoundError:
        raise InputError(f"inputs file not found: {path}") from None
    missing = [n for n in spec.input_names if n not in data.files]
    if missing:
        raise InputError(f"{path} lacks inputs {missing} of {spec.key} (has {data.files})")
    arrays = {t.name: data[t.name] for t in spec.inputs}
    extra = {arrays[t.name].ndim - len(t.shape) for t in spec.inputs}
    if extra == {0}:
        feeds = [arrays]
    elif extra == {1}:
        n = {a.shape[0] for a in arrays.values()}
        if len(n) != 1:
            raise InputError(f"{path}: stacked inputs disagree on the number of iterations {sorted(n)}")
        feeds = [{k: v[i] for k, v in arrays.items()} for i in range(n.pop())]
    else:
        raise InputError(f"{path}: input ranks do not match {spec.key}'s inputs (or a stack of them)")
    dtypes = {t.name: t.dtype for t in spec.inputs}
    out = []
    for feed in feeds:
        feed = {k: np.ascontiguousarray(v.astype(dtypes[k])) for k, v in feed.items()}
        spec.check_dims(spec.dims_of({k: v.shape for k, v in feed.items()}))
        out.append(feed)
    return out


def saved_inputs(graph_dir: str | Path, spec: ExportSpec) -> list[dict[str, np.ndarray]]:
    """Every ``*.npz`` of a graph directory (the export sample, recorded steps...)."""
    feeds: list[dict[str, np.ndarray]] = []
    for path in sorted(Path(graph_dir).glob("*.npz"), key=lambda p: (p.name != INPUTS_NAME, p.name)):
        feeds += load_inputs(path, spec)
    return feeds


# --- polygraphy runners -----------------------------------------------------------------------


@contextlib.contextmanager
def _polygraphy_quiet(verbose: bool) -> Iterator[None]:
    from polygraphy.logger import G_LOGGER

    old = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.module_severity = old


def _runner_classes():
    try:
        from polygraphy.backend.base import BaseRunner
    except ImportError:
        raise MissingDependencyError("polygraphy", "export", "backend comparison") from None

    class TorchRunner(BaseRunner):
        """The float32 torch reference of one graph, as a polygraphy runner."""

        def __init__(self, model, spec: ExportSpec):
            super().__init__(name="torch", prefix="torch-runner")
            self._model, self._spec = model, spec

        def activate_impl(self):
            pass

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata

            meta = TensorMetadata()
            for t in self._spec.inputs:
                meta.add(t.name, np.dtype(t.dtype), [e if isinstance(e, int) else -1 for e in t.shape])
            return meta

        def infer_impl(self, feed_dict):
            import time

            t0 = time.perf_counter()
            out = run_torch(self._model, self._spec, feed_dict)
            self.inference_time = time.perf_counter() - t0
            return out

        def deactivate_impl(self):
            pass

    class ReferenceRunner(BaseRunner):
        """ONNX's reference evaluator (computes bfloat16 graphs on CPU)."""

        def __init__(self, path: Path, spec: ExportSpec):
            super().__init__(name="onnx-ref", prefix="onnx-ref-runner")
            self._path, self._spec = path, spec

        def activate_impl(self):
            import onnx
            from onnx.reference import ReferenceEvaluator

            self._ev = ReferenceEvaluator(onnx.load(str(self._path)))

        def get_input_metadata_impl(self):
            return TorchRunner.get_input_metadata_impl(self)

        def infer_impl(self, feed_dict):
            import time

            t0 = time.perf_counter()
            outs = self._ev.run(None, dict(feed_dict))
            self.inference_time = time.perf_counter() - t0
            return {name: np.asarray(o, dtype=np.float32) for name, o in zip(self._spec.output_names, outs)}

        def deactivate_impl(self):
            del self._ev

    return TorchRunner, ReferenceRunner


def _make_runner(backend: str, path: Path, spec: ExportSpec):
    if backend == "ort":
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        return OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]), name="ort")
    if backend == "onnx-ref":
        return _runner_classes()[1](path, spec)
    if backend == "trt":
        from polygraphy.backend.trt import TrtRunner

        return TrtRunner(engine_loader(path, spec), name="trt")
    raise InputError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")


def default_backends(spec: ExportSpec) -> list[str]:
    """ONNX Runtime where it has kernels (not bfloat16), plus TensorRT where it runs."""
    backends = ["onnx-ref" if spec.precision.compute_dtype == "bfloat16" else "ort"]
    if has_tensorrt_gpu():
        backends.append("trt")
    return backends


# --- comparison -----------------------------------------------------------------------------


@dataclass
class GraphReport:
    """Error statistics of one graph: ``rows[i]`` = one backend at one iteration."""

    key: str
    tolerance: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r["ok"] for r in self.rows)


def compare_graph(model, spec: ExportSpec, onnx_path: str | Path, feeds: Sequence[Mapping[str, np.ndarray]],
                  backends: Iterable[str] | None = None, verbose: bool = False) -> GraphReport:
    """Run torch and ``backends`` on ``feeds`` with polygraphy's Comparator and compare
    every backend with torch."""
    from polygraphy.comparator import Comparator, CompareFunc

    onnx_path = Path(onnx_path)
    backends = list(backends or default_backends(spec))
    TorchRunner, _ = _runner_classes()
    runners = [TorchRunner(model, spec)] + [_make_runner(b, onnx_path, spec) for b in backends]
    feeds = [{k: np.asarray(v) for k, v in f.items()} for f in feeds]
    with _polygraphy_quiet(verbose):
        results = Comparator.run(runners, data_loader=feeds)
        if verbose:
            atol = TOLERANCES[tolerance_name(spec)][0] or 1e-2
            Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=0.0))
    report = GraphReport(spec.key, tolerance_name(spec))
    by_runner = dict(results.items())
    reference = by_runner.pop(runners[0].name)
    for backend, runner in zip(backends, runners[1:]):
        for i, (ref, out) in enumerate(zip(reference, by_runner[runner.name])):
            for name in spec.output_names:
                stats = error_stats(out[name], ref[name])
                report.rows.append({"backend": backend, "iteration": i, "output": name, **stats,
                                    "ok": within(stats, report.tolerance)})
    return report


def verify_export(root: str | Path, model=None, networks: Iterable[str] | None = None,
                  inputs: str | Path | None = None, backends: Iterable[str] | None = None,
                  verbose: bool = False) -> list[GraphReport]:
    """Compare every graph (of ``networks``) of an export directory with the reference
    on its saved inputs (or ``inputs``). ``model`` defaults to the export's source."""
    index: ExportIndex = load_export(root)
    if model is None:
        if not index.source:
            raise InputError(f"{root} does not record its source model; pass one")
        model = load_model_or_preset(index.source, seed=index.seed)
    reports = []
    for key, spec in sorted(index.specs.items()):
        if networks and spec.network not in networks:
            continue
        feeds = load_inputs(inputs, spec) if inputs else saved_inputs(index.root / key, spec)
        reports.append(compare_graph(model, spec, index.path(key), feeds,
                                     backends=backends, verbose=verbose))
    if not reports:
        raise InputError(f"no graphs of {list(networks or [])} in {root}")
    return reports


def format_report(reports: Sequence[GraphReport]) -> str:
    """A fixed-width table of the statistics."""
    head = (f"{'graph':22s} {'backend':8s} {'iter':>4s} {'max_abs':>10s} {'mean_abs':>10s} {'cosine':>12s}"
            f"  tolerance    ok")
    lines = [head, "-" * len(head)]
    for r in reports:
        for row in r.rows:
            cos = row["cosine"]
            lines.append(f"{r.key:22s} {row['backend']:8s} {row['iteration']:4d} {row['max_abs']:10.3g} "
                         f"{row['mean_abs']:10.3g} {cos:12.9f}  {r.tolerance:11s}  "
                         f"{'yes' if row['ok'] else 'NO'}")
    return "\n".join(lines)


__all__ = ["error_stats", "within", "tolerance_name", "load_inputs", "saved_inputs", "compare_graph",
           "verify_export", "format_report", "GraphReport", "BACKENDS"]
