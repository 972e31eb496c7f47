"""The one statistics implementation behind every tolerance check."""

import numpy as np
import pytest
import torch

from easyanimate_rt.errors import ExportError
from easyanimate_rt.tolerances import TOLERANCES, check_close, cosine, error_stats, within


def test_cosine_edge_cases_agree_for_numpy_and_torch():
    z = np.zeros(5)
    x = np.arange(1.0, 6.0)
    assert cosine(z, z) == 1.0 and cosine(torch.zeros(5), torch.zeros(5)) == 1.0  # identical outputs
    assert cosine(z, x) == 0.0 and cosine(x, z) == 0.0
    assert cosine(x, -x) == pytest.approx(-1.0)
    a, b = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    expected = float(a @ b / (a.norm() * b.norm()))
    assert cosine(a, b) == pytest.approx(expected, abs=1e-12)
    assert cosine(a.numpy(), b.numpy()) == pytest.approx(expected, abs=1e-12)


def test_error_stats_and_within():
    e = np.linspace(-1, 1, 64)
    a = e + 5e-6
    s = error_stats(a, e)
    assert s["max_abs"] == pytest.approx(5e-6) and s["mean_abs"] == pytest.approx(5e-6)
    assert s["finite"] and s["ref_max_abs"] == 1.0
    assert within(s, "reference_exact")
    assert not within(error_stats(e + 2e-5, e), "reference_exact")
    inf = error_stats(np.where(e > 0.5, np.inf, e), e)
    assert not inf["finite"] and inf["cosine"] == 0.0 and not within(inf, "onnx_fp16")
    with pytest.raises(ExportError, match="output sizes differ"):
        error_stats(np.zeros(3), np.zeros(4))


def test_check_close_raises_with_the_statistics():
    e = torch.randn(4, 8)
    assert check_close(e + 1e-6, e, "reference_exact")["max_abs"] <= TOLERANCES["reference_exact"][0]
    with pytest.raises(AssertionError, match="reference_exact: .* outside tolerance"):
        check_close(e + 1e-3, e, "reference_exact")
    with pytest.raises(AssertionError, match="shape"):
        check_close(e[:2], e, "reference_exact")
