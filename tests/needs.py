"""``require``: the one way a test imports a library of the ``[dev]`` extra."""

import importlib
import os

import pytest

#: Libraries the [dev] extra installs. Under CI (CI=true) a missing one fails the test
#: that needs it; elsewhere that test is skipped with the extra to install.
DEV_EXTRA = {"onnx": "export", "onnxscript": "export", "onnx_ir": "export", "onnxruntime": "export",
             "polygraphy": "export", "diffusers": "dev", "cv2": "data", "scenedetect": "data",
             "rapidocr": "data"}


#: CI sets CI=true; there a library of the [dev] extra is never a reason to skip.
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(module: str):
    """Import ``module`` (a [dev]-extra library): fail under CI, skip elsewhere."""
    if ON_CI:
        return importlib.import_module(module)
    extra = DEV_EXTRA.get(module, "dev")
    return pytest.importorskip(module, reason=f"needs {module} (pip install -e \".[{extra}]\")")
