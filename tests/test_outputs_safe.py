"""No command writes into, replaces or deletes what it did not create, and a user's
mistake about a path or a broken file is exit 2 with one line naming the file and the
rule (never "unexpected ..."). Each command is pointed at a folder of unrelated files,
which must stay byte for byte; refusals happen before any work."""

from __future__ import annotations

import json

import pytest
from user_files import snapshot

from easyanimate_rt.cli import main


@pytest.fixture
def user_dir(tmp_path):
    """Someone's folder, holding files named like the ones our commands write."""
    root = tmp_path / "mine"
    root.mkdir()
    (root / "holiday.jpg").write_bytes(bytes(range(256)) * 20)
    (root / "train.py").write_text("import this\n")
    (root / "dit").mkdir()
    (root / "dit" / "model.onnx").write_bytes(b"my own graph")
    (root / "export").mkdir()
    (root / "export" / "notes.md").write_text("# notes\n")
    return root, snapshot(root)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "unexpected" not in err, err
    return code, out, err


@pytest.mark.parametrize("argv", [
    ["export", "tiny", "--out", "{dir}", "-q"],
    ["build", "tiny", "--out", "{dir}", "--backend", "ort-cpu", "--buckets", "32x32x1", "-q"],
])
def test_export_and_build_refuse_a_folder_of_the_users(capsys, user_dir, tmp_path, argv):
    root, before = user_dir
    argv = [a.replace("{dir}", str(root)) for a in argv] + ["--cache-dir", str(tmp_path / "c")][: 2 * (argv[0] == "build")]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert f"--out {root} already holds files that are not a" in err and "holiday.jpg" in err
    assert snapshot(root) == before and not (tmp_path / "c").exists()


@pytest.mark.parametrize("command", ["export", "build"])
def test_out_pointing_at_a_file_is_refused(capsys, tmp_path, command):
    target = tmp_path / "video.mp4"
    target.write_bytes(b"not a folder")
    extra = ["--backend", "ort-cpu", "--buckets", "32x32x1"] if command == "build" else []
    code, _, err = run(capsys, command, "tiny", "--out", target, *extra)
    assert code == 2 and f"--out {target} is a file, not a folder" in err
    assert target.read_bytes() == b"not a folder"
    code, _, err = run(capsys, command, "tiny", "--out", target / "sub", *extra)
    assert code == 2 and "is a file, not a folder" in err


def test_export_reuses_its_own_folder(capsys, tmp_path):
    out = tmp_path / "exp"
    assert main(["export", "tiny", "--out", str(out), "--networks", "text_encoder", "-q"]) == 0
    (out / "README-mine.txt").write_text("a note I keep beside the export\n")
    assert main(["export", "tiny", "--out", str(out), "--networks", "text_encoder", "-q"]) == 0  # ours: allowed
    assert (out / "README-mine.txt").read_text() == "a note I keep beside the export\n"
    capsys.readouterr()
    # a truncated graph is named before any work by verify
    graph = out / "text_encoder" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:200])
    code, _, err = run(capsys, "verify", out)
    assert code == 2 and str(graph) in err and "truncated" in err
    # export.json of the wrong shape
    (out / "export.json").write_text("[]")
    code, _, err = run(capsys, "verify", out)
    assert code == 2 and "export.json holds a JSON list" in err


def test_build_refuses_a_bucket_that_cannot_fit_before_any_work(capsys, tmp_path):
    code, _, err = run(capsys, "build", "tiny", "--out", tmp_path / "e", "--backend", "ort-cpu",
                       "--buckets", "4096x4096x17", "--cache-dir", tmp_path / "c")
    assert code == 2 and "bucket 4096x4096x17 would need about" in err and "GiB" in err
    assert not (tmp_path / "e").exists() and not (tmp_path / "c").exists()


def test_serve_refuses_a_bucket_that_cannot_fit(tmp_path):
    from easyanimate_rt.engines.buckets import Bucket
    from easyanimate_rt.errors import InputError
    from easyanimate_rt.runtime.pipeline import Pipeline

    with pytest.raises(InputError, match="bucket 4096x4096x17 would need"):
        Pipeline.from_pretrained("tiny", buckets=[Bucket(4096, 4096, 17)], cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()
    # the command: refused before the store, a worker or an export exists
    code = main(["serve", "--model", "tiny", "--store", str(tmp_path / "store"), "--device", "cpu",
                 "--buckets", "32x32x1,4096x4096x17", "--cache-dir", str(tmp_path / "c")])
    assert code == 2 and not (tmp_path / "store").exists() and not (tmp_path / "c").exists()


def test_engines_verify_names_a_manifest_of_the_wrong_shape(capsys, tmp_path):
    root = tmp_path / "e"
    (root / "dit").mkdir(parents=True)
    (root / "engines.json").write_text(json.dumps({"format": 1, "networks": {"dit": {"dir": "dit"}}}))
    (root / "dit" / "manifest.json").write_text("[]")
    code, out, err = run(capsys, "engines", "verify", root)
    assert code == 2 and "manifest.json" in err and "JSON object" in err
    (root / "dit" / "manifest.json").write_text(json.dumps({"format": 1, "key": "dit", "artifact": "x"}))
    code, out, err = run(capsys, "engines", "verify", root)
    assert code == 2 and "manifest.json" in err and "field" in err
    (root / "engines.json").write_text(json.dumps({"format": 1, "networks": {"dit": {"dir": "../../etc"}}}))
    code, out, err = run(capsys, "engines", "verify", root)
    assert code == 2 and "engines.json" in err and "'networks'" in err


def test_cache_fit_checks_its_model_and_target_first(capsys, tmp_path, monkeypatch):
    code, _, err = run(capsys, "cache-fit", "--model", "no/such/model")
    assert code == 2 and "model directory not found: no/such/model" in err and "presets" in err
    assert "is a preset" not in err
    code, _, err = run(capsys, "cache-fit", "--model", "nosuchpreset")
    assert code == 2 and "nosuchpreset" in err and "tiny" in err
    # --out: a file of the user's is never replaced; a folder is not a file
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}\n')
    code, _, err = run(capsys, "cache-fit", "--model", "tiny", "--out", mine)
    assert code == 2 and "is not a step-cache file" in err and mine.read_text() == '{"mine": true}\n'
    code, _, err = run(capsys, "cache-fit", "--model", "tiny", "--out", tmp_path)
    assert code == 2 and "is a folder, not a file" in err
    # a model folder that cannot be written (read-only, as a user without the rights sees it)
    import os

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    code, _, err = run(capsys, "cache-fit", "--model", str(tmp_path), "--out", tmp_path / "fit.json")
    assert code == 2 and "is not writable" in err and not (tmp_path / "fit.json").exists()


def test_cache_fit_write_errors_name_the_file(capsys, tmp_path, monkeypatch):
    """A write that fails after fitting (the folder turned read-only, a full disk) is exit
    2 naming the file, not an unexpected PermissionError. (The fit itself is stubbed: the
    write is what is tested.)"""
    from types import SimpleNamespace

    from easyanimate_rt.reference.config import from_preset
    from easyanimate_rt.runtime import step_cache
    from easyanimate_rt.runtime.pipeline import Pipeline

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Pipeline, "from_pretrained", lambda *a, **k: SimpleNamespace(config=from_preset("tiny")))
    monkeypatch.setattr(step_cache, "calibrate", lambda *a: ([1.0, 0.0], [(0.1, 0.1), (0.2, 0.2), (0.3, 0.3)]))
    monkeypatch.setattr(step_cache, "save_rescale", refuse)
    code, _, err = run(capsys, "cache-fit", "--model", "tiny", "--out", tmp_path / "fit.json")
    assert code == 2 and f"cannot write {tmp_path / 'fit.json'}: Permission denied" in err
    assert not (tmp_path / "fit.json").exists()


@pytest.mark.parametrize("backend, rule", [
    ("dit=ort,dit=torch", "network 'dit' is named twice"),
    ("dit=ort,torch", "is not NETWORK=BACKEND"),
    ("dit=ort,unet=torch", "unknown network 'unet'"),
])
def test_backend_choice_names_each_network_once(capsys, tmp_path, backend, rule):
    code, _, err = run(capsys, "generate", "a red circle", "--model", "tiny", "--backend", backend,
                       "--out", tmp_path / "v.mp4")
    assert code == 2 and rule in err and not (tmp_path / "v.mp4").exists()


def test_a_broken_text_encoder_config_is_named(capsys, tmp_path):
    import shutil

    from easyanimate_rt.cli import default_model

    model = tmp_path / "m"
    shutil.copytree(default_model(), model)
    (model / "text_encoder" / "config.json").write_text('{"d_model": ')
    code, _, err = run(capsys, "generate", "a red circle", "--model", model, "--backend", "torch",
                       "--out", tmp_path / "v.mp4")
    assert code == 2 and f"{model / 'text_encoder' / 'config.json'} is not valid JSON" in err
    (model / "text_encoder" / "config.json").write_text('["a list"]')
    code, _, err = run(capsys, "generate", "a red circle", "--model", model, "--backend", "torch",
                       "--out", tmp_path / "v.mp4")
    assert code == 2 and "holds a JSON list" in err and not (tmp_path / "v.mp4").exists()
