"""Step caching with a drift guard: skip the DiT's tail between similar denoising steps.

The DiT runs as two graphs when caching is on (export/spec.py ``dit_cache/head``,
``dit_cache/tail``): the head (patch, time and caption embeddings and the first block) every
step, the tail (the other blocks, U-ViT skips, final layer) only when the policy says
so. The head also returns the final layer applied to its first-block output plus the
cached tail residual (``skip_pred``): on a skipped step that is the step's prediction,
so a skip costs one block and one final layer on any backend.

Policies (``--cache``):
  fbcache   First-Block-Cache: the relative L1 change of the first block's residual
            since the last computed step; below the threshold, skip.
  teacache  TeaCache: the relative L1 change of the first block's timestep-modulated
            input since the previous step, through a polynomial rescale fitted on the
            model (``fit_rescale``; ``easyanimate-rt cache-fit``), accumulated over the
            skipped steps; skip while the sum stays below the threshold.
The first ``warmup`` and last ``cooldown`` steps are always computed; guidance branches
share one decision (the metric is taken over the whole batch).

Drift guard: every ``check_every``-th skip, and whenever ``max_skips`` skips in a row
would be exceeded, the tail is computed anyway and compared with the cached prediction
(relative L1); above ``drift_bound`` the threshold is halved for the rest of the run and
a line is logged. Each run reports its computed, skipped and checked steps.

Torch-free: the metrics run on whatever arrays the loop holds: numpy on the CPU
runtime, device tensors in the GPU loop (one host sync per metric: a decision is a
branch on the host).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ConfigError, InputError
from ..reference.config import STEP_CACHE_NAME

log = logging.getLogger(__name__)

POLICIES = ("none", "fbcache", "teacache")
#: Default thresholds, chosen on the shipped model (benchmarks/step_cache.py, RESULTS.md): the
#: most skips with the shapes scores of the uncached run and PSNR >= 30 dB against it.
DEFAULT_THRESHOLDS = {"fbcache": 0.3, "teacache": 0.2}
RESCALE_NAME = STEP_CACHE_NAME  # beside the model's config; not part of its fingerprint


@dataclass
class CacheSettings:
    policy: str = "none"
    threshold: float | None = None  # None: the policy's default
    warmup: int = 2                 # first steps always computed
    cooldown: int = 1               # last steps always computed
    check_every: int = 4            # drift guard: every k-th skip is computed and compared
    max_skips: int = 3              # at most this many skips in a row (the next is checked)
    drift_bound: float = 0.15       # relative L1 of a cached prediction that lowers the threshold
    rescale: Sequence[float] | None = None  # teacache: polynomial coefficients (highest first)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InputError(f"step cache policy must be one of {list(POLICIES)}, got {self.policy!r}")
        if self.threshold is None:
            self.threshold = DEFAULT_THRESHOLDS.get(self.policy, 0.0)
        if not isinstance(self.threshold, (int, float)) or not np.isfinite(self.threshold) or self.threshold < 0:
            raise InputError(f"step cache threshold must be a finite number >= 0, got {self.threshold!r}")
        for name in ("warmup", "cooldown", "check_every", "max_skips"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name != "cooldown" else 0):
                low = 1 if name != "cooldown" else 0
                raise InputError(f"step cache {name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.drift_bound, (int, float)) or not self.drift_bound > 0:
            raise InputError(f"step cache drift_bound must be > 0, got {self.drift_bound!r}")

    @property
    def enabled(self) -> bool:
        return self.policy != "none"


def _mean_abs(x) -> float:
    if hasattr(x, "detach"):  # a torch tensor: accumulate in float32 whatever its dtype
        return float(x.detach().abs().float().mean())
    return float(np.abs(x).mean())


def _keep(x):
    """A copy the next step cannot overwrite (numpy array or torch tensor)."""
    return x.clone() if hasattr(x, "clone") else x.copy()


def rel_l1(a, b) -> float:
    """mean |a - b| / mean |b| (0 where b is all zeros and a equals it); numpy arrays or
    torch tensors."""
    den = _mean_abs(b)
    num = _mean_abs(a - b)
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


@dataclass
class StepCache:
    """One run's decisions. Per step: ``decide(i, signals)`` -> "compute", "skip" or
    "check"; after a computed or checked step ``computed(i, signals)``; after a check
    ``checked(i, error)``."""

    settings: CacheSettings
    steps: int
    threshold: float = field(init=False)
    decisions: list[str] = field(default_factory=list)
    drift: list[tuple[int, float]] = field(default_factory=list)
    fired: list[dict[str, Any]] = field(default_factory=list)
    _ref: np.ndarray | None = None       # fbcache: residual at the last computed step
    _prev: np.ndarray | None = None      # teacache: modulated input at the previous step
    _acc: float = 0.0
    _run: int = 0                        # skips in a row
    _skips: int = 0                      # skips since the last check
    _raw: float = float("inf")           # teacache: this step's un-rescaled input change
    _prev_out: np.ndarray | None = None  # the last computed prediction (calibration)
    pairs: list[tuple[float, float]] = field(default_factory=list)  # (input change, output change)

    def __post_init__(self) -> None:
        self.threshold = float(self.settings.threshold)

    def metric(self, signals: dict[str, np.ndarray]) -> float:
        s = self.settings
        if s.policy == "fbcache":
            return rel_l1(signals["first_residual"], self._ref) if self._ref is not None else float("inf")
        change = rel_l1(signals["modulated"], self._prev) if self._prev is not None else float("inf")
        self._raw = change
        if s.rescale is not None and np.isfinite(change):
            change = float(max(np.polyval(np.asarray(s.rescale, np.float64), change), 0.0))
        return change

    def decide(self, i: int, signals: dict[str, np.ndarray]) -> str:
        s = self.settings
        m = self.metric(signals)
        if s.policy == "teacache":
            self._prev = _keep(signals["modulated"])
        if i < s.warmup or i >= self.steps - s.cooldown or not np.isfinite(m):
            return self._record("compute")
        would_skip = (self._acc + m if s.policy == "teacache" else m) < self.threshold
        if not would_skip:
            return self._record("compute")
        if self._run >= s.max_skips or self._skips + 1 >= s.check_every:
            return self._record("check")
        if s.policy == "teacache":
            self._acc += m
        self._run += 1
        self._skips += 1
        return self._record("skip")

    def _record(self, decision: str) -> str:
        self.decisions.append(decision)
        return decision

    def computed(self, i: int, signals: dict[str, np.ndarray]) -> None:
        """After the tail ran at step ``i`` (computed or checked): the new reference."""
        if self.settings.policy == "fbcache":
            self._ref = _keep(signals["first_residual"])
        self._acc = 0.0
        self._run = 0

    def observe(self, i: int, prediction: np.ndarray, consecutive: bool) -> None:
        """Calibration: pair this step's input change with its output change (relative L1
        against the previous step's prediction, when that step was computed too)."""
        if consecutive and self._prev_out is not None and np.isfinite(self._raw):
            self.pairs.append((self._raw, rel_l1(prediction, self._prev_out)))
        self._prev_out = prediction

    def checked(self, i: int, error: float) -> None:
        """The drift guard at step ``i``: ``error`` = rel L1 of the cached prediction
        against the computed one. Above the bound, the threshold halves."""
        self._skips = 0
        self.drift.append((i, error))
        if error > self.settings.drift_bound:
            old, self.threshold = self.threshold, self.threshold / 2
            self.fired.append({"step": i, "error": error, "threshold": self.threshold})
            log.info("step cache: drift %.3f > %.3f at step %d; threshold %.4g -> %.4g for the rest of the run",
                     error, self.settings.drift_bound, i, old, self.threshold)

    def report(self) -> dict[str, Any]:
        return {"policy": self.settings.policy, "threshold": self.settings.threshold,
                "final_threshold": self.threshold, "computed": self.decisions.count("compute"),
                "skipped": self.decisions.count("skip"), "checked": self.decisions.count("check"),
                "decisions": "".join({"compute": "C", "skip": ".", "check": "k"}[d] for d in self.decisions),
                "drift": [(i, round(e, 5)) for i, e in self.drift], "fired": self.fired}


# --- TeaCache's rescale polynomial -------------------------------------------------------------


def fit_rescale(input_changes: Sequence[float], output_changes: Sequence[float], degree: int = 2) -> list[float]:
    """Least-squares polynomial (highest power first) from the relative L1 change of the
    modulated input between consecutive steps to that of the DiT's output."""
    x, y = np.asarray(input_changes, np.float64), np.asarray(output_changes, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() <= degree:
        raise ConfigError(f"fitting the TeaCache rescale needs more than {degree} step pairs, got {int(ok.sum())}")
    return [float(c) for c in np.polyfit(x[ok], y[ok], degree)]


def calibrate(pipe, prompts: Sequence[str], steps: int | None = None, degree: int = 2,
              **request: Any) -> tuple[list[float], list[tuple[float, float]]]:
    """Fit TeaCache's rescale on ``pipe`` (a runtime Pipeline built with the teacache
    policy at threshold 0, so every step computes): each prompt is generated once and
    every pair of consecutive steps gives (input change, output change)."""
    if pipe.step_cache.policy != "teacache" or pipe.step_cache.threshold != 0:
        raise ConfigError("calibrate needs a pipeline with CacheSettings('teacache', 0.0): every step computed")
    pairs: list[tuple[float, float]] = []
    for prompt in prompts:
        req = pipe.request(prompt, **({"steps": steps} if steps else {}), **request)
        emb, mask = pipe.encode(req)
        pairs += pipe.denoised(req, emb, mask).cache_pairs
    return fit_rescale(*zip(*pairs), degree=degree), pairs


def save_rescale(path: str | Path, coefficients: Sequence[float], info: dict[str, Any]) -> Path:
    from ..fileio import atomic_write_text

    path = Path(path)
    atomic_write_text(path, json.dumps({"teacache_rescale": list(coefficients), **info}, indent=2) + "\n")
    return path


def load_rescale(model_dir: str | Path | None) -> list[float] | None:
    """The model's fitted TeaCache polynomial (``step_cache.json`` beside its config)."""
    if model_dir is None or not Path(model_dir).is_dir():
        return None
    path = Path(model_dir) / RESCALE_NAME
    if not path.exists():
        return None
    try:
        coeffs = json.loads(path.read_text())["teacache_rescale"]
        return [float(c) for c in coeffs]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a step-cache file ({exc})") from None


__all__ = ["POLICIES", "CacheSettings", "StepCache", "rel_l1", "fit_rescale", "save_rescale", "load_rescale"]
