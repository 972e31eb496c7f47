"""The TensorRT refit of a LoRA (engines/trt_refit.py), around what needs a GPU: the values
a refit sets, found in the base export by content, are exactly the initializers an export
of the merged model holds (same names, same bytes); the refit itself goes through
TensorRT's Refitter API, here a recording stand-in that checks names and completeness."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from exported import build_model
from needs import require

from easyanimate_rt.errors import EngineError
from easyanimate_rt.export.spec import spec_of
from easyanimate_rt.reference.lora import Adapter, lora_targets, merged_state, save_kohya
from easyanimate_rt.engines.ort_swap import base_values
from easyanimate_rt.engines.trt_refit import refit_plan, refit_values


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny model's DiT exported as is and with a LoRA merged."""
    for m in ("onnx", "onnxscript"):
        require(m)
    from easyanimate_rt.export.onnx import export_graph
    from easyanimate_rt.reference.lora import merge_loras

    root = tmp_path_factory.mktemp("refit")
    model = build_model("tiny")
    g = torch.Generator().manual_seed(4)
    layers = {n: (torch.randn(2, m.weight.shape[1], generator=g) * 0.1, torch.randn(m.weight.shape[0], 2, generator=g) * 0.1)
              for n, m in list(lora_targets(model).items())[:12]}
    adapter = Adapter.open(save_kohya(root / "l.safetensors", layers, alpha=2.0, rank=2))
    spec = spec_of(model.config, "dit")
    export_graph(model, spec, root / "base")
    merge_loras(model, [adapter])
    export_graph(model, spec, root / "merged")
    merged = {k.split(".", 1)[1]: v for k, v in merged_state(model, [adapter]).items()}
    base = {k.split(".", 1)[1]: v for k, v in base_values(model, [f"dit.{k}" for k in merged]).items()}
    return root, merged, base


def _initializers(path):
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def test_refit_values_are_the_merged_exports_initializers(exports):
    root, merged, base = exports
    values = refit_values(root / "base" / "dit" / "model.onnx", merged, base)
    want = _initializers(root / "merged" / "dit" / "model.onnx")
    assert len(values) == len(merged) == 12
    for name, value in values.items():
        assert value.dtype == want[name].dtype and np.array_equal(value, want[name]), name
    base_inits = _initializers(root / "base" / "dit" / "model.onnx")
    assert all(not np.array_equal(base_inits[n], v) for n, v in values.items())  # every refit changes a weight


def test_a_weight_not_in_the_export_cannot_be_refitted(exports):
    root, merged, base = exports
    name = next(iter(merged))
    with pytest.raises(EngineError, match="not initializers of the exported graph.*cannot be refitted"):
        refit_values(root / "base" / "dit" / "model.onnx", merged, {**base, name: base[name] + 1})


class FakeTrt:
    """The slice of the tensorrt module refit_plan uses, recording what it is given."""

    class Logger:
        WARNING = 2

        def __init__(self, level=None):
            pass

    def __init__(self, weights, missing=()):
        trt = self
        self.set: dict = {}

        class Engine:
            def serialize(self):
                return b"refitted:" + ",".join(sorted(trt.set)).encode()

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, plan):
                return Engine() if plan == b"plan" else None

        class Refitter:
            def __init__(self, engine, logger):
                pass

            def get_all_weights(self):
                return list(weights)

            def set_named_weights(self, name, w):
                trt.set[name] = w
                return True

            def get_missing_weights(self):
                return list(missing)

            def refit_cuda_engine(self):
                return True

        self.Runtime, self.Refitter, self.Weights = Runtime, Refitter, lambda a: a


def test_refit_plan_sets_every_value_by_name_and_serialises():
    trt = FakeTrt(["val_1", "val_2", "bias"])
    values = {"val_1": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float16)}
    assert refit_plan(trt, b"plan", values) == b"refitted:bias,val_1"
    assert set(trt.set) == {"val_1", "bias"} and trt.set["bias"].dtype == np.float16
    with pytest.raises(EngineError, match="no refittable weight 'val_9'.*built with --refit"):
        refit_plan(FakeTrt(["val_1"]), b"plan", {"val_9": np.ones(2, np.float32)})
    with pytest.raises(EngineError, match="still lacks 1 weight"):
        refit_plan(FakeTrt(["val_1"], missing=["val_2"]), b"plan", {"val_1": np.ones(2, np.float32)})
    with pytest.raises(EngineError, match="could not be deserialized"):
        refit_plan(FakeTrt(["val_1"]), b"broken", {})
