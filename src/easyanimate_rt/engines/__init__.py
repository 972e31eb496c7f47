"""Engine builders (DESIGN.md 4): exported ONNX graphs -> TensorRT / TensorRT-RTX plans or
ONNX Runtime sessions. ``tensorrt`` (datacenter, GPU) and ``tensorrt_rtx`` (ahead of
time, no GPU needed) import their libraries lazily."""
