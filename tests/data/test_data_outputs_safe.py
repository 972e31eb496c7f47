"""`data split|score|filter|caption` never write over, append to or replace a file they
did not create.

split --out must be new, empty or a dataset folder of ours (dataset.json, or split's
ledger for a dataset split before the marker); a stage's output must be new or its own
(the ledger beside it names the stage). Anything else: exit 2 before any work, every
file byte for byte as it was, and nothing new anywhere.
"""

import json
import shutil

import pytest
from needs import require
from user_files import snapshot, user_folder

from easyanimate_rt.cli import main
from easyanimate_rt.data.manifest import read_manifest, write_manifest
from easyanimate_rt.data.parallel import LEDGER_KIND, ledger_path, ledger_stage
from easyanimate_rt.fileio import mark_dir

RECORD = {"caption": "", "frames": 30, "fps": 10.0, "width": 96, "height": 64}
SCORED = {**RECORD, "scores": {"motion": 5.0, "text_area": 0.0, "aesthetic": 5.0}}


def _refused(argv, root, capsys, *words):
    """Run the CLI; assert exit 2, the words in the one-line error, and ``root`` untouched."""
    before = snapshot(root)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert snapshot(root) == before  # every file as it was, and nothing new anywhere
    return err


# --- split ----------------------------------------------------------------------------------

SPLIT_CASES = ("user-folder", "lookalike-marker", "lookalike-ledger", "another-kind-of-our-folders", "a-file",
               "inside-a-file")


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_refuses_an_out_it_did_not_create(case, synth, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(synth["cuts"], raw / "cuts.mp4")  # real work to do, were the folder accepted
    ws = tmp_path / "ws"
    ws.mkdir()
    if case == "user-folder":
        out = user_folder(ws / "mine", "clips.jsonl", "manifest.jsonl", "clips/a.mp4")
        words = (str(out), "not a dataset folder written by easyanimate-rt", "nothing was written")
    elif case == "lookalike-marker":
        out = user_folder(ws / "mine", "dataset.json")
        words = (str(out), "dataset.json", "not a dataset folder written by easyanimate-rt")
    elif case == "lookalike-ledger":
        out = user_folder(ws / "mine", "clips.log.jsonl", "clips.jsonl")
        words = (str(out), "clips.log.jsonl", "not a dataset folder written by easyanimate-rt")
    elif case == "another-kind-of-our-folders":  # e.g. an engine folder: ours, but not a dataset
        out = mark_dir(ws / "engines", "engine directory")
        (out / "index.json").write_text("{}\n")
        words = (str(out), "not a dataset folder written by easyanimate-rt")
    elif case == "a-file":
        out = ws / "dataset.tar"
        out.write_bytes(b"my archive" * 50)
        words = (str(out), "is a file, not a folder")
    else:
        (ws / "dataset.tar").write_bytes(b"my archive" * 50)
        out = ws / "dataset.tar" / "ds"
        words = (str(out), "is a file, not a folder")
    _refused(["data", "split", str(raw), "--out", str(out), "--no-progress"], tmp_path, capsys, *words)


def test_split_resumes_a_dataset_split_before_the_marker(synth, tmp_path, capsys):
    """A dataset folder with split's ledger but no dataset.json (split before the marker
    existed) is split's own: the rerun skips the finished video and marks the folder."""
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(synth["cuts"], raw / "cuts.mp4")
    ds = tmp_path / "ds"
    (ds / "clips").mkdir(parents=True)
    write_manifest(ds / "clips.jsonl", [{"path": "clips/c.mp4", **RECORD}])
    ledger_path(ds / "clips.jsonl").write_text(json.dumps({"key": "cuts.mp4", "status": "ok", "records": 1}) + "\n")
    assert main(["data", "split", str(raw), "--out", str(ds), "--no-progress"]) == 0
    assert "1 already done" in capsys.readouterr().out
    assert json.loads((ds / "dataset.json").read_text())["kind"] == "easyanimate-rt dataset"
    assert [r.path for r in read_manifest(ds / "clips.jsonl")] == ["clips/c.mp4"]


# --- score, filter, caption -----------------------------------------------------------------

def _dataset(root, manifest: str, record: dict):
    """A folder of the user's holding a valid input manifest (so the stage would run)."""
    user_folder(root)
    write_manifest(root / manifest, [{"path": "videos/birthday.mp4", **record}])
    return root


def _stage_case(stage: str, case: str, tmp_path):
    """(argv, words) for one stage pointed at a file it did not create."""
    src, out, record, extra = {
        "score": ("clips.jsonl", "scores.jsonl", RECORD, ["--scores", "motion", "--no-progress"]),
        "filter": ("scores.jsonl", "filtered.jsonl", SCORED, []),
        "caption": ("filtered.jsonl", "manifest.jsonl", SCORED, ["--no-progress"]),
    }[stage]
    ds = _dataset(tmp_path / "ds", src, record)
    argv = ["data", stage, str(ds), *extra]
    rule = f"not written by `easyanimate-rt data {stage}`"
    if case == "default-output-exists":  # DIR/<stage>.jsonl is the user's
        user_folder(ds, out)
        return argv, (str(ds / out), rule, "nothing was written")
    if case == "output-elsewhere-exists":  # --output names a file of the user's
        target = user_folder(tmp_path / "elsewhere", "manifest.jsonl") / "manifest.jsonl"
        return [*argv, "--output", str(target)], (str(target), rule, "--output", "nothing was written")
    if case == "lookalike-ledger":  # only the ledger's name is taken, by a file of the user's
        ledger = ledger_path(ds / out)
        ledger.write_text('{"key": "mine", "status": "mine"}\n')
        return argv, (str(ledger), "not a ledger easyanimate-rt wrote", "nothing was written")
    if case == "output-is-a-folder":
        (ds / "target").mkdir()
        (ds / "target" / "keep.txt").write_text("mine\n")
        return [*argv, "--output", str(ds / "target")], (str(ds / "target"), "is a folder, not a file")
    if case == "output-is-the-input":
        return [*argv, "--output", str(ds / src)], (str(ds / src), "is the input manifest")
    if case == "another-stages-output":  # ours, but written by another stage
        other = "caption" if stage != "caption" else "score"
        write_manifest(ds / out, [{"path": "videos/birthday.mp4", **SCORED}])
        ledger_path(ds / out).write_text(json.dumps({"kind": LEDGER_KIND, "format": 1, "stage": other}) + "\n")
        return argv, (str(ds / out), f"written by `easyanimate-rt data {other}`, not `data {stage}`")
    raise AssertionError(case)


STAGE_CASES = ("default-output-exists", "output-elsewhere-exists", "lookalike-ledger", "output-is-a-folder",
               "output-is-the-input", "another-stages-output")


@pytest.mark.parametrize("case", STAGE_CASES)
@pytest.mark.parametrize("stage", ("score", "filter", "caption"))
def test_stage_refuses_an_output_it_did_not_create(stage, case, tmp_path, capsys):
    if stage == "score":
        require("cv2")  # score checks its libraries before it would write
    argv, words = _stage_case(stage, case, tmp_path)
    _refused(argv, tmp_path, capsys, *words)


def test_filter_refuses_a_summary_it_did_not_write(tmp_path, capsys):
    ds = _dataset(tmp_path / "ds", "scores.jsonl", SCORED)
    user_folder(ds, "filter_summary.json")
    _refused(["data", "filter", str(ds)], tmp_path, capsys, str(ds / "filter_summary.json"),
             "not a filter summary written by easyanimate-rt", "nothing was written")


def test_stage_reruns_into_its_own_output(tmp_path, capsys):
    """Caption (no model: nothing to load) twice into its output: the rerun recognises it
    by its ledger and resumes. A ledger from before headers is recognised by its lines;
    filter's output from before it kept a ledger, by the summary beside it."""
    ds = _dataset(tmp_path / "ds", "filtered.jsonl", SCORED)
    argv = ["data", "caption", str(ds), "--no-progress"]
    assert main(argv) == 0
    assert ledger_stage(ledger_path(ds / "manifest.jsonl")) == "caption"
    first = (ds / "manifest.jsonl").read_bytes()
    assert main(argv) == 0
    assert "1 already done" in capsys.readouterr().out
    assert (ds / "manifest.jsonl").read_bytes() == first
    ledger = ledger_path(ds / "manifest.jsonl")
    ledger.write_text("".join(line + "\n" for line in ledger.read_text().splitlines()[1:]))  # no header
    assert ledger_stage(ledger) == ""
    assert main(argv) == 0 and "1 already done" in capsys.readouterr().out
    # filter: rerun into its own output (its ledger), then into one from before the ledger
    ds = _dataset(tmp_path / "ds2", "scores.jsonl", SCORED)
    assert main(["data", "filter", str(ds), "--motion", "6:8"]) == 0
    assert read_manifest(ds / "filtered.jsonl") == []
    assert main(["data", "filter", str(ds)]) == 0
    assert ledger_stage(ledger_path(ds / "filtered.jsonl")) == "filter"
    assert len(read_manifest(ds / "filtered.jsonl")) == 1
    ledger_path(ds / "filtered.jsonl").unlink()
    assert main(["data", "filter", str(ds), "--motion", "6:8"]) == 0
    assert read_manifest(ds / "filtered.jsonl") == []
    capsys.readouterr()


def test_ledger_recognition(tmp_path):
    ledger = tmp_path / "x.log.jsonl"
    header = json.dumps({"kind": LEDGER_KIND, "format": 1, "stage": "score"}) + "\n"
    ledger.write_text(header + '{"key": "a", "status": "ok"}\n{"key": "b", "sta')  # torn by a kill
    assert ledger_stage(ledger) == "score"
    ledger.write_text('{"key": "a", "status": "error", "error": "x"}\n')  # from before headers
    assert ledger_stage(ledger) == ""
    for foreign in (b"\xff\xd8\xff\xe0 a photo\n", b'{"key": "a", "status": "ok"}\nnot json\n', b"[1, 2]\n",
                    b"", b'{"key": "a", "status": "ok"}'):  # the last: no complete line at all
        ledger.write_bytes(foreign)
        assert ledger_stage(ledger) is None, foreign
    assert ledger_stage(tmp_path / "missing.log.jsonl") is None
