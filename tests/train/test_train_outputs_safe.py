"""`train shapes|vae|dit` never write into, prune or replace a folder they did not create.

--run must be new, empty or a run folder of ours (run.json, or a checkpoint of a run
made before the marker); --out new, empty or a model directory of ours (a parsing
easyanimate_rt.json); neither inside the other. Anything else: exit 2 before any work,
every file byte for byte as it was, and nothing new anywhere.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from user_files import snapshot, user_folder

from easyanimate_rt.cli import main
from easyanimate_rt.fileio import mark_dir
from easyanimate_rt.media import write_clip
from easyanimate_rt.train.common import (
    RUN_KIND,
    claim_run_dir,
    is_run_dir,
    save_checkpoint,
)

COMMANDS = ("shapes", "vae", "dit")


def _argv(command: str, manifest, run, out) -> list[str]:
    """Each command at its smallest: one step, tiny model, 16-32 px, 9 frames."""
    tail = ["--run", str(run), "--out", str(out)]
    if command == "shapes":
        return ["train", "shapes", "--scale", "1e-6", *tail]
    common = ["--manifest", str(manifest), "--model", "tiny", "--frames", "1", "--batch-size", "1", *tail]
    if command == "vae":
        return ["train", "vae", "--size", "16", "--steps", "1", *common]
    return ["train", "dit", "--size", "32", "--image-steps", "1", "--lowres-steps", "0", "--video-steps", "0",
            "--cache-size", "2", *common]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """One 9-frame 32x32 clip, listed in a manifest."""
    root = tmp_path_factory.mktemp("train-data")
    frames = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    write_clip(frames, root / "a.mp4")
    (root / "manifest.jsonl").write_text(json.dumps(
        {"path": "a.mp4", "caption": "a red circle moving left", "frames": 9, "fps": 8, "width": 32,
         "height": 32}) + "\n")
    return root / "manifest.jsonl"


RUN_LOOKALIKES = ("metrics.csv", "run.json", "recipe.json", "checkpoints/latest", "checkpoints/step-000001/x",
                  "tensorboard/events", "cache/images.pt", "vae/checkpoints/latest")
MODEL_LOOKALIKES = ("easyanimate_rt.json", "transformer/config.json", "vae/diffusion_pytorch_model.safetensors")


def _case(name: str, root):
    """(run, out, words the error must hold) for one way of pointing at the wrong place."""
    root.mkdir()
    run, out = root / "new-run", root / "new-model"
    if name == "run-is-a-user-folder":
        run = user_folder(root / "mine", *RUN_LOOKALIKES)
        return run, out, (str(run), "not a training run folder", "nothing was written")
    if name == "run-holds-only-lookalikes":
        run = user_folder(root / "mine", "run.json")
        return run, out, (str(run), "run.json", "not a training run folder", "nothing was written")
    if name == "out-is-a-user-folder":
        out = user_folder(root / "mine", *MODEL_LOOKALIKES)
        return run, out, (str(out), "not a model directory", "nothing was written")
    if name == "out-is-a-user-folder-without-lookalikes":
        out = user_folder(root / "mine")
        return run, out, (str(out), "not a model directory", "nothing was written")
    if name == "out-is-another-kind-of-our-folders":  # e.g. an engine folder: ours, but not a model
        out = mark_dir(root / "engines", "engine directory")
        (out / "index.json").write_text("{}\n")
        return run, out, (str(out), "not a model directory", "nothing was written")
    if name == "run-is-another-kind-of-our-folders":
        run = mark_dir(root / "engines", "engine directory")
        return run, out, (str(run), "not a training run folder", "nothing was written")
    if name == "out-is-a-file":
        out = root / "model.safetensors"
        out.write_bytes(b"\x00weights of mine" * 64)
        return run, out, (str(out), "is a file")
    if name == "run-is-a-file":
        run = root / "run.txt"
        run.write_text("not a folder\n")
        return run, out, (str(run), "is a file")
    if name == "run-equals-out":
        return out, out, ("--run", "--out", "separate folders", "nothing was written")
    if name == "out-inside-run":
        return run, run / "model", ("separate folders", "neither inside the other")
    if name == "run-inside-out":
        return out / "run", out, ("separate folders", "neither inside the other")
    raise AssertionError(name)


CASES = ("run-is-a-user-folder", "run-holds-only-lookalikes", "out-is-a-user-folder",
         "out-is-a-user-folder-without-lookalikes", "out-is-another-kind-of-our-folders",
         "run-is-another-kind-of-our-folders", "out-is-a-file", "run-is-a-file", "run-equals-out",
         "out-inside-run", "run-inside-out")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", COMMANDS)
def test_refuses_a_target_it_did_not_create(command, case, manifest, tmp_path, capsys):
    run, out, words = _case(case, tmp_path / "ws")
    before = snapshot(tmp_path)
    assert main(_argv(command, manifest, run, out)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert snapshot(tmp_path) == before  # every file as it was, and nothing new anywhere


@pytest.mark.parametrize("command", ("vae", "dit"))
def test_fresh_run_then_resume_into_its_own_folders(command, manifest, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "model"
    argv = _argv(command, manifest, run, out)
    assert main(argv) == 0
    marker = json.loads((run / "run.json").read_text())
    assert marker["kind"] == RUN_KIND and marker["command"] == f"train {command}"
    assert (out / "easyanimate_rt.json").is_file() and (run / "checkpoints" / "latest").is_file()
    rows = (run / "metrics.csv").read_text()
    # Rerun: the run folder and the model directory are ours, so it resumes (all steps
    # done: no new metrics row) and replaces the model; the marker is kept.
    assert main(argv) == 0
    assert json.loads((run / "run.json").read_text()) == marker
    assert (run / "metrics.csv").read_text() == rows
    assert (out / "easyanimate_rt.json").is_file()
    # A run made before the marker existed is recognised by its checkpoint, and marked.
    (run / "run.json").unlink()
    assert main(argv) == 0
    assert (run / "metrics.csv").read_text() == rows
    assert json.loads((run / "run.json").read_text())["kind"] == RUN_KIND
    capsys.readouterr()


def test_run_folder_recognition(tmp_path):
    fresh = tmp_path / "fresh"
    assert claim_run_dir(fresh) == fresh and not fresh.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_run_dir(empty) == empty
    # a run of `train vae|dit` from before the marker: a checkpoint that resumes
    old = tmp_path / "old"
    save_checkpoint(old, 3, {"x": torch.zeros(1)}, {})
    (old / "metrics.csv").write_text("step,stage\n")
    assert is_run_dir(old) and claim_run_dir(old) == old
    # an old `train shapes` run: its first phase's checkpoint
    shapes = tmp_path / "shapes"
    save_checkpoint(shapes / "vae", 1, {"x": torch.zeros(1)}, {})
    (shapes / "tokenizer").mkdir()
    assert is_run_dir(shapes)
    # a checkpoints/latest that names no checkpoint, or a binary one, is not ours
    for content in (b"step-000009\n", b"\xff\xfe\x00binary"):
        fake = tmp_path / f"fake{len(content)}"
        (fake / "checkpoints").mkdir(parents=True)
        (fake / "checkpoints" / "latest").write_bytes(content)
        (fake / "photo.jpg").write_bytes(b"\xff\xd8")
        assert not is_run_dir(fake)
    shutil.rmtree(old / "checkpoints")
    assert not is_run_dir(old)
