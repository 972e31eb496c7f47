"""Engine backends: ``torch`` (the reference modules), ``ort`` (ONNX Runtime sessions on
built engine directories). Each imports its library lazily."""
