"""ONNX export of the four reference networks (DESIGN.md 4): ExportSpec per graph,
dynamo export, precision policies (fp32 / fp16 / bf16 with fp32 islands, FP8 Q/DQ),
graph passes and backend comparison. ONNX libraries are imported lazily."""

from .onnx import (ExportIndex, export_graph, export_model, graph_module, load_export, lower, run_torch, trace,
                   write_graph)
from .precision import PRECISIONS, PrecisionPolicy, convert_precision, policy_for
from .spec import (DECODER_VARIANTS, ENCODER_VARIANTS, NETWORKS, DimSpec, ExportSpec, Profile, TensorSpec,
                   decoder_variant, decoder_variants, dit_spec, make_specs, text_encoder_spec, vae_decoder_spec,
                   vae_encoder_spec)

__all__ = [
    "ExportSpec", "TensorSpec", "DimSpec", "Profile", "make_specs", "text_encoder_spec", "dit_spec",
    "vae_encoder_spec", "vae_decoder_spec", "decoder_variants", "decoder_variant", "NETWORKS",
    "ENCODER_VARIANTS", "DECODER_VARIANTS", "PrecisionPolicy", "policy_for", "convert_precision", "PRECISIONS",
    "trace", "lower", "write_graph", "export_graph", "export_model", "load_export", "ExportIndex",
    "graph_module", "run_torch",
]
