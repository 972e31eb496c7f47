"""Every exported graph builds with TensorRT-RTX ahead of time (DESIGN.md 5): the ONNX
parser and the builder accept the graph and its optimisation profiles. A graph
TensorRT rejects fails the test; outside CI the tests skip when TensorRT-RTX is not
installed (extra: rtx, part of [dev]); under CI a missing TensorRT-RTX fails them."""

from __future__ import annotations

import pytest
from exported import ci_models
from needs import ON_CI

from easyanimate_rt.engines import tensorrt_rtx as rtx
from easyanimate_rt.errors import EngineError
from easyanimate_rt.export.precision import policy_for
from easyanimate_rt.export.spec import DECODER_VARIANTS

pytestmark = [pytest.mark.tensorrt,
              pytest.mark.skipif(not rtx.is_available() and not ON_CI,
                                 reason="tensorrt-rtx is not installed (extra: rtx)")]

# The DiT builds take 10-50 s each on 2 cores (the first one traces the graph too).
_SLOW = pytest.mark.slow
FP32_GRAPHS = ["text_encoder", "dit", "vae_encoder/image", "vae_encoder/slice"] + \
              [f"vae_decoder/{v}" for v in DECODER_VARIANTS]
# Graphs that differ from fp32 in the other precisions (T5 stays fp32 in fp16 exports,
# the VAE stays fp32 unless asked).
LOWERED = [pytest.param("dit", "fp16", marks=_SLOW), pytest.param("dit", "bf16", marks=_SLOW),
           ("text_encoder", "bf16"), pytest.param("dit", "fp8", marks=_SLOW)]


def _build(exports, name, key, precision="fp32", policy=None):
    spec, path = exports.written(name, key, precision, policy)
    result = rtx.build_aot(path, spec, rtx.DEFAULT_COMPUTE_CAPABILITY)
    assert result.plan_bytes > 0 and result.layers > 0
    for inp in spec.inputs:
        assert len(result.inputs[inp.name]) == 3 * len(spec.profiles)
    return result


def _fp32_cases() -> list:
    """Every fp32 graph of the last CI model (the shipped one when it exists); the other
    models' VAE graphs have the same layers at other sizes, so only their text encoder is
    built again (each VAE build is 10-13 s on 2 cores). The fp32 DiTs are built by
    test_dit_builds_with_one_profile_per_bucket, with the builder's profiles."""
    models = ci_models()
    return [(models[-1], key) for key in FP32_GRAPHS if key != "dit"] + [(m, "text_encoder") for m in models[:-1]]


@pytest.mark.parametrize("name,key", _fp32_cases())
def test_fp32_graphs_build(exports, name, key):
    _build(exports, name, key)


@pytest.mark.parametrize("key,precision", LOWERED)
@pytest.mark.parametrize("name", ci_models())
def test_lowered_graphs_build(exports, name, key, precision):
    _build(exports, name, key, precision)


def test_bf16_vae_decoder_builds(exports):
    _build(exports, "tiny", "vae_decoder/interior", "bf16", policy_for("vae_decoder", "bf16", vae="bf16"))


def test_rejected_graph_is_an_engine_error(tmp_path, exports):
    import onnx
    from onnx import TensorProto, helper

    spec, _ = exports.written("tiny", "text_encoder")
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("NoSuchOp", ["input_ids"], ["text_embeddings"])], "bad",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 16])],
        [helper.make_tensor_value_info("text_embeddings", TensorProto.FLOAT, None)]),
        opset_imports=[helper.make_opsetid("", 19)])
    path = tmp_path / "bad.onnx"
    onnx.save(bad, path)
    with pytest.raises(EngineError, match="rejected"):
        rtx.build_aot(path, spec)
    with pytest.raises(EngineError, match="compute capability must be one of"):
        rtx.build_aot(path, spec, "SM90")


def test_plan_is_written_atomically(tmp_path, exports):
    spec, path = exports.written("tiny", "text_encoder")
    plan = tmp_path / "engines" / "text_encoder.plan"
    result = rtx.build_aot(path, spec, "SM120", plan_path=plan)
    assert plan.stat().st_size == result.plan_bytes
    assert [p.name for p in plan.parent.iterdir()] == ["text_encoder.plan"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ci_models())
def test_dit_builds_with_one_profile_per_bucket(exports, name):
    """The builder's profiles (a video bucket for a batch of up to 4 prompts and an image
    bucket -> two static profiles, or one ranged one) are accepted by TensorRT-RTX for
    the tiny and the shipped fp32 DiT."""
    from easyanimate_rt.engines.buckets import bucket_shapes, parse_buckets, profiles_for
    from easyanimate_rt.engines.build import widen

    spec, path = exports.written(name, "dit")
    cfg = exports.model(name).config
    shapes = [bucket_shapes(cfg, b) for b in parse_buckets("64x64x1,64x64x17b4")]
    for ranged, count in ((False, 2), (True, 1)):
        profiles, _ = profiles_for(spec, shapes, ranged)
        built = rtx.build_aot(path, widen(spec, profiles), rtx.DEFAULT_COMPUTE_CAPABILITY, profiles=profiles)
        assert len(profiles) == count and len(built.inputs["latents"]) == 3 * count and built.plan_bytes > 0
        # (min, opt, max) per profile: the batch profile spans 1 .. 4 prompts (batch 2 .. 8)
        assert built.inputs["latents"][-3:] == ([(2, 4, 5, 8, 8), (8, 4, 5, 8, 8), (8, 4, 5, 8, 8)] if not ranged
                                                else [(2, 4, 1, 8, 8), (8, 4, 5, 8, 8), (8, 4, 5, 8, 8)])
