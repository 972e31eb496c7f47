"""Filter scored clips by the paper's thresholds (DESIGN.md 3.2) and count what each rule removed.

Defaults from the paper: keep 3 < motion < 8, drop text area > 0.02, drop aesthetic
< 4.0. Optional extra rules: duration and short-side bounds. A clip whose score is
missing (null) passes that rule by default (``on_missing="keep"``; the summary counts
such clips) or fails it with ``on_missing="drop"``. A clip that breaks several rules is
counted under each of them; ``removed`` is the number of distinct clips dropped.

The output, the summary beside it and the output's ledger (one line per run) are
written only over files filter wrote before (:func:`claim_filter_output`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from easyanimate_rt.errors import InputError
from easyanimate_rt.data.manifest import ClipRecord
from easyanimate_rt.fileio import atomic_write_text, check_writable_file


@dataclass(frozen=True)
class Range:
    """An open interval (low, high); either end may be None (unbounded)."""

    low: float | None = None
    high: float | None = None

    def __contains__(self, value: float) -> bool:
        return (self.low is None or value > self.low) and (self.high is None or value < self.high)

    def __str__(self) -> str:
        return f"{'' if self.low is None else f'{self.low:g}'}:{'' if self.high is None else f'{self.high:g}'}"


def parse_range(text: str) -> Range:
    """``"3:8"`` -> Range(3, 8); ``"3:"`` and ``":8"`` are one-sided."""
    parts = text.split(":")
    if len(parts) != 2:
        raise InputError(f"a range must look like LOW:HIGH (either may be empty), got {text!r}")
    try:
        low, high = (float(p) if p.strip() else None for p in parts)
    except ValueError as e:
        raise InputError(f"a range must look like LOW:HIGH with numbers, got {text!r}") from e
    if low is not None and high is not None and low >= high:
        raise InputError(f"range low must be below high, got {text!r}")
    return Range(low, high)


@dataclass(frozen=True)
class FilterConfig:
    motion: Range | None = Range(3.0, 8.0)
    max_text: float | None = 0.02
    min_aesthetic: float | None = 4.0
    duration: Range | None = None  # seconds
    min_side: int | None = None  # pixels, shorter side
    on_missing: str = "keep"

    def __post_init__(self) -> None:
        if self.on_missing not in ("keep", "drop"):
            raise InputError(f"on_missing must be 'keep' or 'drop', got {self.on_missing!r}")
        if self.max_text is not None and not 0 <= self.max_text <= 1:
            raise InputError(f"max_text is an area fraction in [0, 1], got {self.max_text}")


@dataclass
class FilterSummary:
    total: int = 0
    kept: int = 0
    removed_by: dict[str, int] = field(default_factory=dict)  # rule -> clips failing it
    missing: dict[str, int] = field(default_factory=dict)  # score -> clips without it

    @property
    def removed(self) -> int:
        return self.total - self.kept

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "removed": self.removed,
                "removed_by": dict(self.removed_by), "missing": dict(self.missing)}


# A rule: (name, score key or None, test on the value or the record)
_Rule = tuple[str, str | None, Callable]


def _rules(cfg: FilterConfig) -> list[_Rule]:
    rules: list[_Rule] = []
    if cfg.motion is not None:
        rules.append((f"motion {cfg.motion}", "motion", lambda v: v in cfg.motion))
    if cfg.max_text is not None:
        rules.append((f"text_area <= {cfg.max_text:g}", "text_area", lambda v: v <= cfg.max_text))
    if cfg.min_aesthetic is not None:
        rules.append((f"aesthetic >= {cfg.min_aesthetic:g}", "aesthetic", lambda v: v >= cfg.min_aesthetic))
    if cfg.duration is not None:
        rules.append((f"duration {cfg.duration}", None, lambda r: r.seconds in cfg.duration))
    if cfg.min_side is not None:
        rules.append((f"short side >= {cfg.min_side}", None, lambda r: min(r.width, r.height) >= cfg.min_side))
    return rules


def filter_records(records: Sequence[ClipRecord], cfg: FilterConfig = FilterConfig()
                   ) -> tuple[list[ClipRecord], FilterSummary]:
    rules = _rules(cfg)
    summary = FilterSummary(total=len(records), removed_by={name: 0 for name, _, _ in rules})
    kept: list[ClipRecord] = []
    for record in records:
        passed = True
        for name, key, test in rules:
            if key is None:
                ok = bool(test(record))
            else:
                value = record.scores.get(key)
                if value is None or not math.isfinite(value):
                    summary.missing[key] = summary.missing.get(key, 0) + 1
                    ok = cfg.on_missing == "keep"
                else:
                    ok = bool(test(value))
            if not ok:
                summary.removed_by[name] += 1
                passed = False
        if passed:
            kept.append(record)
    summary.kept = len(kept)
    return kept, summary


DEFAULT_OUTPUT = "filtered.jsonl"
SUMMARY_NAME = "filter_summary.json"
_SUMMARY_KEYS = {"total", "kept", "removed", "removed_by", "missing"}


def _is_summary(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and _SUMMARY_KEYS <= set(data)


def claim_filter_output(output: str | Path, source: str | Path | None = None) -> Path:
    """Check, before any work, that filter may replace ``output`` and the summary beside
    it: each new or written by filter (see ``parallel.claim_output``); an InputError
    naming the file otherwise."""
    from easyanimate_rt.data.parallel import claim_output, ledger_path

    output = Path(output)
    summary = output.with_name(SUMMARY_NAME)
    if summary.exists() and not _is_summary(summary):
        raise InputError(f"{summary} already exists and is not a filter summary written by easyanimate-rt; a "
                         f"stage never overwrites a file it did not create: pass an output path in another "
                         f"folder (--output), nothing was written")
    if output.name == DEFAULT_OUTPUT and output.is_file() and not ledger_path(output).exists() and summary.exists():
        # Written by filter before it kept a ledger: the summary beside it is filter's.
        check_writable_file(output, "output")
        if source is not None and output.resolve() == Path(source).resolve():
            raise InputError(f"output {output} is the input manifest; pass a new output path (--output)")
        return output
    return claim_output(output, "filter", source)


def filter_manifest(manifest: str | Path, output: str | Path, config: FilterConfig = FilterConfig()
                    ) -> FilterSummary:
    """Filter ``manifest`` into ``output`` (written atomically), write the summary beside
    it (``filter_summary.json``) and return it. A ledger beside ``output`` records each
    run, so a later run recognises ``output`` as filter's (:func:`claim_filter_output`)."""
    from easyanimate_rt.data.manifest import append_jsonl, rebase_path, read_manifest, write_manifest
    from easyanimate_rt.data.parallel import ledger_path, open_ledger

    manifest, output = Path(manifest), Path(output)
    claim_filter_output(output, manifest)
    kept, summary = filter_records(read_manifest(manifest), config)
    out = []
    for record in kept:
        data = record.to_dict()
        data["path"] = rebase_path(record.path, manifest.parent, output.parent)
        out.append(data)
    ledger = open_ledger(ledger_path(output), "filter")
    write_manifest(output, out)
    atomic_write_text(output.with_name(SUMMARY_NAME), json.dumps(summary.to_dict(), indent=2) + "\n")
    append_jsonl(ledger, [{"key": str(manifest), "status": "ok", "records": len(out)}])
    return summary
