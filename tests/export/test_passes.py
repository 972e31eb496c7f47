"""Graph passes and writing: the repeat_interleave translation, graphsurgeon folding
that leaves FP8 Q/DQ alone, I/O checks, node counts, external data, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from exported import ort_session
from onnx import TensorProto, helper, numpy_helper

from easyanimate_rt.errors import ExportError
from easyanimate_rt.export import onnx as export_onnx
from easyanimate_rt.export.graphs import run_torch, translation_table
from easyanimate_rt.export.passes import fold_and_cleanup, format_counts, node_counts, set_io_shapes
from easyanimate_rt.tolerances import check_close


class _Repeat(torch.nn.Module):
    def forward(self, x, frames):
        a = x.repeat_interleave(frames.shape[0], dim=0)      # symbolic repeats, dim 0
        b = x.repeat_interleave(frames.shape[0], dim=1)      # symbolic repeats, middle dim
        c = x.repeat_interleave(3, dim=2)                    # static repeats
        return a.sum() + b.sum() + c.sum() + a[-1].sum() * 2 + b[:, -1].sum() * 3, a, b


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_repeat_interleave_with_symbolic_repeats(tmp_path):
    """torchlib (onnxscript 0.7) expands along the wrong axis when repeats is symbolic;
    the exporter's translation table fixes it."""
    from torch.export import Dim

    x, f = torch.randn(2, 5, 3), torch.zeros(4)
    program = torch.onnx.export(
        _Repeat().eval(), (x, f), dynamo=True, opset_version=19, custom_translation_table=translation_table(),
        dynamic_shapes=({0: Dim("b", min=1, max=8)}, {0: Dim("f", min=1, max=8)}), verbose=False)
    program.save(str(tmp_path / "r.onnx"))
    session = ort_session(tmp_path / "r.onnx")
    for b, n in [(2, 3), (3, 2), (1, 5), (4, 4)]:
        xi, fi = torch.randn(b, 5, 3), torch.zeros(n)
        got = session.run(None, {"x": xi.numpy(), "frames": fi.numpy()})
        want = _Repeat()(xi, fi)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)


def _qdq_model() -> onnx.ModelProto:
    w8 = helper.make_tensor("w8", TensorProto.FLOAT8E4M3FN, [2, 2], [1.0, 2.0, -1.0, 0.5])
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    shape = numpy_helper.from_array(np.array([2, 2], np.int64), "shape")
    nodes = [helper.make_node("DequantizeLinear", ["w8", "scale"], ["w"]),
             helper.make_node("Reshape", ["w", "shape"], ["w2"]),
             helper.make_node("MatMul", ["x", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              initializer=[w8, scale, shape])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_folding_leaves_fp8_dequantize_alone():
    out = fold_and_cleanup(_qdq_model())
    ops = [n.op_type for n in out.graph.node]
    assert "DequantizeLinear" in ops  # FP8 weights stay FP8
    assert {i.name: i.data_type for i in out.graph.initializer}["w8"] == TensorProto.FLOAT8E4M3FN
    assert node_counts(out)["MatMul"] == 1


def test_node_counts_and_format():
    counts = node_counts(_qdq_model())
    assert counts == {"DequantizeLinear": 1, "MatMul": 1, "Reshape": 1}
    assert format_counts({"Add": 3, "Mul": 2}) == "Add 3, Mul 2"
    assert "\n" in format_counts({f"Op{i}": i for i in range(40)}, width=40)


def test_io_mismatch_is_an_export_error(exports):
    spec = exports.spec("tiny", "text_encoder")
    model = exports.trace("tiny", "text_encoder")
    wrong = spec.replace(outputs=(spec.outputs[0].__class__("hidden", "float32", ("batch", 16, 32)),))
    with pytest.raises(ExportError, match="do not match"):
        set_io_shapes(model, wrong)
    set_io_shapes(model, spec)
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "16"]


def test_external_data_path(exports, tmp_path, monkeypatch):
    """Release-size graphs (> 1.8 GB) keep their weights in model.onnx.data; exercised
    on the tiny T5 by lowering the threshold."""
    monkeypatch.setattr(export_onnx, "PROTO_PASS_LIMIT", 0)
    spec = exports.spec("tiny", "text_encoder")
    model = exports.trace("tiny", "text_encoder")
    spec = export_onnx.write_graph(model, spec, tmp_path / "text_encoder")
    assert spec.graph["external_data"] == "model.onnx.data"
    files = sorted(p.name for p in (tmp_path / "text_encoder").iterdir())
    assert files == ["inputs.npz", "model.onnx", "model.onnx.data", "spec.json"]
    assert (tmp_path / "text_encoder" / "model.onnx.data").stat().st_size > 100_000
    feeds = spec.random_inputs({"batch": 3}, seed=4)
    (got,) = ort_session(tmp_path / "text_encoder" / "model.onnx").run(None, feeds)
    want = run_torch(exports.model("tiny"), spec, feeds)["text_embeddings"]
    check_close(torch.from_numpy(got), torch.from_numpy(want), "onnx_fp32")
    assert not list(tmp_path.glob(".*"))  # no temporary directories left behind


def test_written_graph_directory(exports):
    spec, path = exports.written("tiny", "vae_decoder/lone")
    directory = path.parent
    assert sorted(p.name for p in directory.iterdir()) == ["inputs.npz", "model.onnx", "spec.json"]
    saved = json.loads((directory / "spec.json").read_text())
    assert saved["graph"]["nodes"] == sum(saved["graph"]["nodes_by_op"].values())
    assert saved["graph"]["nodes_by_op"] == node_counts(onnx.load(path))
    assert len(saved["graph"]["sha256"]) == 64
    inputs = np.load(directory / "inputs.npz")
    assert inputs["context"].shape == spec.input_shapes(spec.sample)["context"]
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 1, "8*height", "8*width"]
