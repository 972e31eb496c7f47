"""ONNX export of the four reference networks (DESIGN.md 4): ``spec`` (the torch-free
ExportSpec per graph), ``graphs`` (the torch modules traced per graph), ``onnx`` (dynamo
export, lowering and writing), ``index`` (``export.json``), ``precision`` (fp16 / bf16
with fp32 islands), ``fp8`` (Q/DQ), ``passes`` and the ``export`` command. Nothing is
imported here, so ``export.spec`` loads without torch or the ONNX libraries."""
