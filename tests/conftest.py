import contextlib
import io
import os

import pytest
import torch
from needs import require

# Two cores shared by the whole suite: keep intra-op threads low and results repeatable.
torch.set_num_threads(int(os.environ.get("EASYANIMATE_TEST_THREADS", "2")))

@pytest.fixture(autouse=True, scope="session")
def _private_engine_cache(tmp_path_factory):
    """Engines built by tests (and the CLI subprocesses they start) go to a session
    folder, never to the user's ~/.cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """Session cache of models, fp32 traces and written graphs (tests/exported.py)."""
    for module in ("onnx", "onnxscript", "onnx_ir", "onnxruntime"):
        require(module)
    from exported import Exports

    return Exports(tmp_path_factory.mktemp("exports"))


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """One CLI export (T5 only: the cheapest graph; the other graphs' directories are
    covered by the library tests), with its printed report."""
    from easyanimate_rt.cli import main

    out = tmp_path_factory.mktemp("cli") / "tiny-fp16"
    argv = ["export", "tiny", "--out", str(out), "--precision", "fp16", "--networks", "text_encoder", "-q"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return out, printed.getvalue()
