"""Precision policies: fp16 graphs on ONNX Runtime CPU at realistic scales (latents of
an actual sampling run) and unit noise; bf16 graphs on the ONNX reference evaluator;
the islands and casts the policy promises; the pass on hand-made graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from exported import ci_models, ort_session, parity_dims, small_sampling
from onnx import TensorProto, helper

from easyanimate_rt.errors import ConfigError
from easyanimate_rt.export import fp8
from easyanimate_rt.export.graphs import run_torch
from easyanimate_rt.export.precision import PrecisionPolicy, convert_precision, policy_for
from easyanimate_rt.tolerances import check_close

FLOAT, FLOAT16, BFLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16


def _types(model: onnx.ModelProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


@pytest.fixture(scope="module", params=ci_models())
def recorded(request, exports):
    """DiT inputs of every step of a real sampling run (plus a second prompt)."""
    model = exports.model(request.param)
    records = fp8.record_dit_inputs(model, fp8.DEFAULT_PROMPTS[2:4], seed=11, **small_sampling(model))
    return request.param, records


def test_fp16_dit_at_realistic_scales(exports, recorded):
    name, records = recorded
    spec, path = exports.written(name, "dit", "fp16")
    model, session = exports.model(name), ort_session(path)
    scales = []
    for r in records:
        feeds = {k: v.numpy() for k, v in r.items()}
        (actual,) = session.run(None, feeds)
        expected = run_torch(model, spec, feeds)["noise_pred"]
        check_close(torch.from_numpy(actual), torch.from_numpy(expected), "onnx_fp16")
        scales.append(float(np.abs(feeds["latents"]).max()))
    # The run covers the whole schedule, and the latents are the sampler's, not the
    # initial noise repeated.
    timesteps = [float(r["timestep"][0]) for r in records]
    assert max(timesteps) > 900 and min(timesteps) < 300
    first, last = records[0]["latents"], records[-1]["latents"]
    assert not torch.allclose(first, last, atol=0.1) and min(scales) > 0.5


def test_fp16_dit_on_unit_noise(exports):
    spec, path = exports.written("tiny", "dit", "fp16")
    session = ort_session(path)
    for seed, dims in enumerate(parity_dims(spec)):
        feeds = spec.random_inputs(dims, seed=seed)
        (actual,) = session.run(None, feeds)
        expected = run_torch(exports.model("tiny"), spec, feeds)["noise_pred"]
        check_close(torch.from_numpy(actual), torch.from_numpy(expected), "onnx_fp16")


def test_fp16_dit_graph_keeps_its_islands(exports):
    spec, path = exports.written("tiny", "dit", "fp16")
    model = onnx.load(path)
    types = _types(model)
    assert spec.precision.compute_dtype == "float16"
    # Graph I/O stays float32 (the contract every backend feeds).
    assert [types[i.name] for i in model.graph.input] == [FLOAT, FLOAT, FLOAT, TensorProto.INT64]
    assert types["noise_pred"] == FLOAT
    island_ops = {"LayerNormalization", "Softmax", "InstanceNormalization"}
    islands = [n for n in model.graph.node if n.op_type in island_ops]
    assert islands and all(types[n.input[0]] == FLOAT for n in islands)
    matmul_weights = [types[n.input[1]] for n in model.graph.node
                      if n.op_type == "MatMul" and n.input[1] in {i.name for i in model.graph.initializer}]
    dit = exports.model("tiny").dit
    block_linears = sum(isinstance(m, torch.nn.Linear) for m in dit.transformer_blocks.modules())
    block_linears += len(dit.long_connect_fc)
    assert matmul_weights.count(FLOAT16) >= block_linears
    assert matmul_weights.count(FLOAT) <= 1  # proj_out (the final layer)
    # The timestep MLP and the final projection are float32.
    inits = {i.name: i.data_type for i in model.graph.initializer}
    assert inits["adaln_single.linear.weight"] == FLOAT
    assert inits["proj_out.bias"] == FLOAT
    assert spec.graph["passes"]["casts"] > 0


def test_fp16_export_keeps_t5_in_fp32(exports):
    spec, path = exports.written("tiny", "text_encoder", "fp16")
    assert spec.precision.compute_dtype == "float32"
    assert FLOAT16 not in set(_types(onnx.load(path)).values())


@pytest.mark.parametrize("key", ["text_encoder", "dit"])
def test_bf16_graphs_on_the_onnx_reference_evaluator(exports, key):
    from onnx.reference import ReferenceEvaluator

    spec, path = exports.written("tiny", key, "bf16")
    assert spec.precision.compute_dtype == "bfloat16"
    model = onnx.load(path)
    assert BFLOAT16 in {i.data_type for i in model.graph.initializer}
    evaluator = ReferenceEvaluator(model)
    for seed, dims in enumerate(parity_dims(spec)[:3]):
        feeds = spec.random_inputs(dims, seed=seed)
        (actual,) = evaluator.run(None, feeds)
        expected = run_torch(exports.model("tiny"), spec, feeds)[spec.output_names[0]]
        check_close(torch.from_numpy(np.asarray(actual, np.float32)), torch.from_numpy(expected), "onnx_bf16")


def test_policy_table():
    assert policy_for("text_encoder", "fp16").compute_dtype == "float32"  # T5 overflows in fp16
    assert policy_for("text_encoder", "bf16").compute_dtype == "bfloat16"
    assert policy_for("dit", "fp16").compute_dtype == "float16"
    fp8_policy = policy_for("dit", "fp8")
    assert fp8_policy.fp8 and fp8_policy.compute_dtype == "float16"
    assert set(fp8_policy.fp8_exclude) == {"pos_embed", "adaln_single", "caption_projection", "clip_projection",
                                           "proj_out"}  # embeddings and the final layer stay in fp16
    for network in ("vae_encoder", "vae_decoder"):
        assert policy_for(network, "bf16").compute_dtype == "float32"
        assert policy_for(network, "bf16", vae="bf16").compute_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="precision must be one of"):
        policy_for("dit", "int8")
    with pytest.raises(ConfigError, match="fp32 or bf16"):
        policy_for("vae_decoder", "fp16", vae="fp16")
    p = policy_for("dit", "fp16")
    assert PrecisionPolicy.from_dict(p.to_dict()) == p


# --- the pass on hand-made graphs ------------------------------------------------------------


def _ir(nodes, inputs, outputs, inits=(), opset=19):
    import onnx_ir as ir

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _policy(dtype="float16", **kw):
    return PrecisionPolicy("fp16" if dtype == "float16" else "bf16", dtype, **kw)


def test_pass_keeps_resize_scales_float32_and_casts_island_boundaries():
    import onnx_ir as ir

    x = helper.make_tensor_value_info("x", FLOAT, [1, 2, 4, 4])
    y = helper.make_tensor_value_info("y", FLOAT, [1, 2, 8, 8])
    scales = onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    w = onnx.numpy_helper.from_array(np.full((8,), 0.5, np.float32), "w")
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["r"], mode="nearest"),
             helper.make_node("Mul", ["r", "w"], ["m"]),
             helper.make_node("Softmax", ["m"], ["s"], axis=-1),
             helper.make_node("Mul", ["s", "w"], ["y"])]
    model = _ir(nodes, [x], [y], [scales, w])
    stats = convert_precision(model, _policy(fp32_op_types=("Softmax",)))
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    types = _types(onnx.shape_inference.infer_shapes(proto, strict_mode=True))
    assert types["scales"] == FLOAT and types["w"] == FLOAT16
    assert types["x"] == FLOAT and types["y"] == FLOAT
    assert stats["casts"] >= 3  # x -> fp16, fp16 -> Softmax fp32, fp32 -> fp16, output -> fp32
    import onnxruntime as ort

    feeds = {"x": np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)}
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    r = feeds["x"].repeat(2, axis=2).repeat(2, axis=3) * 0.5
    e = np.exp(r - r.max(-1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(-1, keepdims=True) * 0.5, atol=2e-3)


def test_pass_saturates_mask_sentinels_and_keeps_conv_fp32_in_bf16():
    import onnx_ir as ir

    x = helper.make_tensor_value_info("x", FLOAT, [1, 1, 3, 3])
    y = helper.make_tensor_value_info("y", FLOAT, [1, 1, 3, 3])
    w = onnx.numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w")
    low = onnx.numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "low")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Add", ["c", "low"], ["y"])]
    model = _ir(nodes, [x], [y], [w, low])
    convert_precision(model, _policy("bfloat16"))
    proto = ir.to_proto(model)
    types = _types(onnx.shape_inference.infer_shapes(proto, strict_mode=True))
    assert types["w"] == FLOAT  # Conv has no bfloat16 at opset 19
    assert types["low"] == BFLOAT16
    low_value = onnx.numpy_helper.to_array([i for i in proto.graph.initializer if i.name == "low"][0])
    assert np.isfinite(np.float32(low_value)) and np.float32(low_value) < -1e38


def test_pass_rejects_weights_that_do_not_fit_fp16():
    from easyanimate_rt.errors import ExportError

    x = helper.make_tensor_value_info("x", FLOAT, [2])
    y = helper.make_tensor_value_info("y", FLOAT, [2])
    big = onnx.numpy_helper.from_array(np.array([1e6, 1.0], np.float32), "big")
    model = _ir([helper.make_node("Mul", ["x", "big"], ["y"])], [x], [y], [big])
    with pytest.raises(ExportError, match="does not fit float16"):
        convert_precision(model, _policy())


def test_pass_handles_constant_of_shape_without_value():
    import onnx_ir as ir

    x = helper.make_tensor_value_info("x", FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", FLOAT, [2, 3])
    shape = onnx.numpy_helper.from_array(np.array([2, 3], np.int64), "shape")
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["z"]),  # float32 zeros by default
             helper.make_node("Add", ["x", "z"], ["y"])]
    model = _ir(nodes, [x], [y], [shape])
    convert_precision(model, _policy(fp32_static=False))
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    import onnxruntime as ort

    feeds = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(got, feeds["x"])


def test_lazy_weight_conversion_equals_eager(exports, monkeypatch, tmp_path):
    """Release-size weights are converted lazily at save time; same graph either way."""
    from easyanimate_rt.export import precision
    from easyanimate_rt.export.onnx import lower, write_graph

    spec, eager_path = exports.written("tiny", "dit", "fp16")
    monkeypatch.setattr(precision, "LAZY_BYTES", 0)
    model = exports.trace("tiny", "dit")
    lazy_spec = exports.spec("tiny", "dit", "fp16")
    write_graph(model, lazy_spec, tmp_path / "dit", stats=lower(model, lazy_spec))
    eager, lazy = onnx.load(eager_path), onnx.load(tmp_path / "dit" / "model.onnx")
    assert {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in eager.graph.initializer} == \
        {i.name: onnx.numpy_helper.to_array(i).tobytes() for i in lazy.graph.initializer}
