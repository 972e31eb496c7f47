import json

import pytest

from easyanimate_rt.data.manifest import (
    ClipRecord,
    append_records,
    read_manifest,
    rebase_path,
    write_manifest,
)
from easyanimate_rt.errors import InputError


def _rec(i: int, **kw) -> dict:
    return {"path": f"clips/{i}.mp4", "caption": f"clip {i}", "frames": 25, "fps": 8, "width": 64,
            "height": 48, **kw}


def test_roundtrip_keeps_unknown_keys_and_null_scores(tmp_path):
    m = tmp_path / "m.jsonl"
    rec = _rec(0, scores={"motion": 4.5, "aesthetic": None}, missing={"aesthetic": "no model"},
               shapes=["circle"], start=1.5)
    write_manifest(m, [rec, ClipRecord.from_dict(_rec(1))])
    back = read_manifest(m)
    assert [r.path for r in back] == ["clips/0.mp4", "clips/1.mp4"]
    assert back[0].scores == {"motion": 4.5, "aesthetic": None}
    assert back[0].missing == {"aesthetic": "no model"}
    assert back[0].extra == {"shapes": ["circle"]}
    assert back[0].fps == 8.0 and back[0].start == 1.5 and back[0].seconds == pytest.approx(25 / 8)
    line = json.loads(m.read_text().splitlines()[0])
    assert line["scores"]["aesthetic"] is None and line["shapes"] == ["circle"]
    assert "scores" not in json.loads(m.read_text().splitlines()[1])  # optional empties are omitted


def test_required_keys_and_types_are_validated(tmp_path):
    bad = _rec(0)
    del bad["caption"]
    with pytest.raises(InputError, match="caption"):
        ClipRecord.from_dict(bad)
    with pytest.raises(InputError, match="frames"):
        ClipRecord.from_dict(_rec(0, frames=0))
    with pytest.raises(InputError, match="non-finite"):
        append_records(tmp_path / "m.jsonl", [_rec(0, scores={"motion": float("nan")})])
    m = tmp_path / "bad.jsonl"
    m.write_text(json.dumps(_rec(0)) + "\n{not json\n" + json.dumps(_rec(1)) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2"):
        read_manifest(m)


def test_torn_last_line_is_ignored_then_cut_by_next_append(tmp_path):
    m = tmp_path / "m.jsonl"
    append_records(m, [_rec(0), _rec(1)])
    with open(m, "a") as f:  # a writer killed mid-line
        f.write(json.dumps(_rec(2))[:30])
    assert [r.path for r in read_manifest(m)] == ["clips/0.mp4", "clips/1.mp4"]
    append_records(m, [_rec(3)])
    assert [r.path for r in read_manifest(m)] == ["clips/0.mp4", "clips/1.mp4", "clips/3.mp4"]
    assert m.read_text().endswith("\n")


def test_rebase_path(tmp_path):
    assert rebase_path("clips/a.mp4", tmp_path, tmp_path) == "clips/a.mp4"
    assert rebase_path("clips/a.mp4", tmp_path / "ds", tmp_path / "out") == "../ds/clips/a.mp4"
    assert rebase_path("/abs/a.mp4", tmp_path / "ds", tmp_path / "out") == "/abs/a.mp4"
