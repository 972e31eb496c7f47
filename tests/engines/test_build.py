"""The engine builder end to end on the CPU: ONNX Runtime engine directories with their
manifest and parity gate, TensorRT-RTX ahead-of-time plans with several profiles, the
keyed cache (reuse, damage, a killed build, concurrent builds) and every mismatch case."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from exported import build_model
from needs import ON_CI, require

from easyanimate_rt.engines import onnxruntime as ortb
from easyanimate_rt.engines import tensorrt_rtx as rtx
from easyanimate_rt.engines.buckets import Bucket, find_profile, parse_buckets
from easyanimate_rt.engines.build import build_engines
from easyanimate_rt.engines.cache import EngineCache
from easyanimate_rt.engines.manifest import INDEX_NAME, Manifest, read_index
from easyanimate_rt.errors import EngineError, InputError
from easyanimate_rt.reference.config import ModelConfig

BUCKETS = parse_buckets("64x64x9,32x64x9,64x64x1")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """An export of the tiny model with every zero-initialised branch randomised (so the
    parity gate compares real outputs), text encoder, DiT and decoder graphs."""
    for m in ("onnx", "onnxscript", "onnxruntime"):
        require(m)
    from easyanimate_rt.export.onnx import export_model

    from easyanimate_rt.reference.weights import save_model

    model = build_model("tiny")
    # saved as a model directory, the export's recorded source: a build outside this
    # process (the CLI's) loads these weights as its reference
    source = save_model(model, tmp_path_factory.mktemp("model") / "tiny")
    root = tmp_path_factory.mktemp("export") / "tiny"
    export_model(model, root, "fp32", ["text_encoder", "dit", "vae_decoder"], source=str(source), seed=0)
    return root, model


@pytest.fixture(scope="module")
def ort_build(export_dir, tmp_path_factory):
    root, model = export_dir
    cache = EngineCache(tmp_path_factory.mktemp("cache"))
    out = tmp_path_factory.mktemp("engines") / "ort"
    t0 = time.perf_counter()
    results = build_engines(root, out, "ort-cpu", BUCKETS, cache=cache, model=model, threads=1)
    return out, cache, results, time.perf_counter() - t0


def test_ort_engine_directory_and_manifest(ort_build, export_dir):
    out, cache, results, _ = ort_build
    index = read_index(out)
    keys = sorted(index["networks"])
    assert keys == ["dit", "text_encoder", "vae_decoder/lone", "vae_decoder/single"]  # 9 frames: lone + single
    assert index["backend"] == "ort-cpu" and index["buckets"] == ["32x64x9", "64x64x1", "64x64x9"]
    dit = Manifest.load(out / "dit")
    assert dit.backend == "ort-cpu" and dit.precision == "fp32" and dit.target["kind"] == "cpu"
    assert dit.versions["onnxruntime"] == ortb.version() and dit.artifact["file"] == ortb.OPTIMIZED_NAME
    # one engine, one static profile per distinct DiT shape: (1 or 3 frames) x (4x8 or 8x8 latents)
    assert dit.buckets == {"32x64x9": 0, "64x64x1": 1, "64x64x9": 2}
    assert [p["dims"]["frames"] for p in dit.profiles] == [[3, 3, 3], [1, 1, 1], [3, 3, 3]]
    assert dit.profiles[0]["shapes"]["latents"] == [[2, 4, 3, 4, 8]] * 3
    # the profiles' opt shapes (3 buckets); the export's saved sample lies outside them: engines run their profiles
    assert dit.parity["ok"] and dit.parity["tolerance"] == "onnx_fp32" and dit.parity["inputs"] == 3
    assert 1e-9 < dit.parity["max_abs"] <= 1e-4 and dit.parity["cosine"] >= 0.99999  # real, non-zero outputs
    assert dit.onnx_sha256 and len(dit.cache_key) == 24 and (cache.root / dit.cache_key).is_dir()
    fusion = dit.flags["transformer_fusions"]  # measured, kept only if parity holds and faster
    assert fusion["parity"] and fusion["applied"] == (fusion["fused_ms"] < fusion["plain_ms"])
    assert fusion["fused_ops"].get("FastGelu", 0) > 0
    text = Manifest.load(out / "text_encoder")
    assert len(text.profiles) == 1 and set(text.buckets.values()) == {0}  # weights shared across buckets
    assert not [p for p in out.rglob(".*partial*")]


def test_engines_run_and_match_the_reference(ort_build, export_dir):
    from easyanimate_rt.export.graphs import run_torch
    from easyanimate_rt.export.index import load_export
    from easyanimate_rt.tolerances import check_close

    out, _, _, _ = ort_build
    root, model = export_dir
    spec = load_export(root).spec("dit")
    m = Manifest.load(out / "dit")
    session = ortb.load(out / "dit", m.artifact["file"], "ort-cpu", threads=1)
    dims = {"batch": 2, "frames": 3, "height": 4, "width": 8}  # bucket 32x64x9
    assert find_profile([type("P", (), {"dims": {k: tuple(v) for k, v in p["dims"].items()}})
                         for p in m.profiles], dims) == m.profile_for("32x64x9")
    feeds = spec.random_inputs(dims, seed=5)
    check_close(session.run(None, feeds)[0], run_torch(model, spec, feeds)["noise_pred"], "onnx_fp32")


def test_second_build_reuses_the_cache_and_the_optimised_model_loads_faster(ort_build, export_dir, tmp_path):
    out, cache, first, first_seconds = ort_build
    root, model = export_dir
    t0 = time.perf_counter()
    again = build_engines(root, tmp_path / "again", "ort-cpu", BUCKETS, cache=cache, model=model, threads=1)
    reuse_seconds = time.perf_counter() - t0
    assert all(r.built for r in first) and not any(r.built for r in again)
    assert [r.entry for r in again] == [r.entry for r in first]
    assert reuse_seconds < first_seconds
    # loading the optimised model vs creating a session (with optimisation) from the ONNX graph
    import onnxruntime as ort

    m = Manifest.load(out / "dit")

    def timed(fn, n=3):
        best = float("inf")
        for _ in range(n):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    cached = timed(lambda: ortb.load(out / "dit", m.artifact["file"], "ort-cpu", threads=1))
    raw = timed(lambda: ort.InferenceSession(str(root / "dit" / "model.onnx"), ortb.session_options(1),
                                             providers=["CPUExecutionProvider"]))
    print(f"dit session: optimised model {cached * 1e3:.1f} ms, from the ONNX graph {raw * 1e3:.1f} ms")
    assert cached > 0 and raw > 0


def test_other_buckets_or_flags_make_another_key(ort_build, export_dir, tmp_path):
    _, cache, first, _ = ort_build
    root, model = export_dir
    other = build_engines(root, tmp_path / "o", "ort-cpu", parse_buckets("64x64x9"), cache=cache, model=model,
                          threads=2)
    keys = {r.key: r.manifest.cache_key for r in first}
    assert all(r.manifest.cache_key != keys[r.key] for r in other)


def test_mismatches_are_errors_that_say_what_differs(ort_build, tmp_path):
    import shutil

    out, _, _, _ = ort_build
    d = tmp_path / "dit"
    shutil.copytree(out / "dit", d)
    m = Manifest.load(d)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"changed graph")
    with pytest.raises(EngineError, match="changed since the engine was built.*easyanimate-rt build"):
        m.check_source(onnx)
    with pytest.raises(EngineError, match=r"built for another environment \(onnxruntime '.*' -> '0.0.1'\)"):
        m.check_environment({"onnxruntime": "0.0.1"}, {})
    with pytest.raises(EngineError, match="target compute_capability None -> 'SM90'"):
        m.check_environment({}, {"compute_capability": "SM90"})
    with pytest.raises(EngineError, match=r"was not built for bucket 512x512x144; it has \['32x64x9'"):
        m.profile_for("512x512x144")
    art = d / m.artifact["file"]
    data = art.read_bytes()
    art.write_bytes(data[: len(data) // 2])
    with pytest.raises(EngineError, match="truncated or replaced"):
        m.check_artifact(d)
    art.write_bytes(data[:-8] + b"XXXXXXXX")
    with pytest.raises(EngineError, match="does not match its manifest hash"):
        m.check_artifact(d)
    art.write_bytes(data[:100])  # a truncated session file: the library's own error, named
    with pytest.raises(EngineError, match="not a loadable ONNX Runtime model"):
        ortb.load(d, m.artifact["file"], "ort-cpu")
    (d / "manifest.json").write_text("{broken")
    with pytest.raises(EngineError, match="manifest.json is corrupt"):
        Manifest.load(d)


def test_bad_requests_fail_before_any_work(export_dir, tmp_path):
    root, model = export_dir
    cache = EngineCache(tmp_path / "c")
    with pytest.raises(InputError, match="bucket 60x64x9: height must be a positive multiple of 16, got 60"):
        build_engines(root, tmp_path / "x", "ort-cpu", [Bucket(60, 64, 9)], cache=cache, model=model)
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        with pytest.raises(EngineError, match="needs ONNX Runtime's CUDAExecutionProvider"):
            ortb.providers("ort-cuda", tmp_path)
    with pytest.raises(InputError, match="--compute-capability is for ahead-of-time builds"):
        build_engines(root, tmp_path / "x", "ort-cpu", BUCKETS, cache=cache, compute_capability="SM89")
    assert not (tmp_path / "x").exists()
    assert not cache.root.exists() or cache.entries() == []


def test_a_failed_parity_gate_leaves_nothing_in_the_cache(export_dir, tmp_path):
    root, _ = export_dir
    wrong = build_model("tiny-grid")  # another model: the engine cannot match it
    wrong.config = ModelConfig.from_dict(json.loads((root / "export.json").read_text())["config"])
    cache = EngineCache(tmp_path / "c")
    with pytest.raises(EngineError, match="text_encoder: parity gate failed: max_abs .* against the torch reference"):
        build_engines(root, tmp_path / "e", "ort-cpu", parse_buckets("64x64x9"), cache=cache, model=wrong)
    assert cache.entries() == [] and not list(cache.root.glob(".*partial*"))


def _slow_build(root: str, key: str, marker: str) -> None:
    def build(staging):
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.5)
        (staging / "plan").write_bytes(b"x" * 10)
        Manifest(key="k", backend="ort-cpu", precision="fp32", onnx_sha256="", spec_sha256="", buckets={},
                 profiles=[], flags={}, versions={}, target={}, build_seconds=0,
                 artifact={"file": "plan", "bytes": 10,
                           "sha256": __import__("hashlib").sha256(b"x" * 10).hexdigest()}).save(staging)
    EngineCache(root).get_or_build(key, build)


def test_two_concurrent_builds_of_one_key_build_once(tmp_path):
    ctx = mp.get_context("spawn")
    marker = tmp_path / "builds.txt"
    procs = [ctx.Process(target=_slow_build, args=(str(tmp_path / "c"), "samekey", str(marker))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(marker.read_text().split()) == 1  # the second waited and reused
    assert EngineCache(tmp_path / "c").lookup("samekey") is not None


def test_a_build_killed_midway_leaves_nothing_a_later_lookup_accepts(tmp_path):
    marker = tmp_path / "builds.txt"
    code = (f"import sys; sys.path[:0] = {[str(Path(__file__).parent), str(Path(__file__).parents[1])]!r}; "
            f"from test_build import _slow_build; _slow_build({str(tmp_path / 'c')!r}, 'k2', {str(marker)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(200):
        if marker.exists():
            break
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cache = EngineCache(tmp_path / "c")
    assert cache.lookup("k2") is None  # only a staging folder was there
    _slow_build(str(tmp_path / "c"), "k2", str(marker))  # the lock died with the process; a rebuild works
    assert cache.lookup("k2") is not None and len(marker.read_text().split()) == 2


@pytest.mark.tensorrt
@pytest.mark.skipif(not rtx.is_available() and not ON_CI, reason="tensorrt-rtx is not installed (extra: rtx)")
def test_rtx_ahead_of_time_plans_with_several_profiles(export_dir, tmp_path):
    root, _ = export_dir
    out = tmp_path / "rtx"
    results = build_engines(root, out, "rtx", parse_buckets("64x64x9,32x64x9"), cache=EngineCache(tmp_path / "c"),
                            compute_capability="SM89")
    dit = Manifest.load(out / "dit")
    assert dit.target == {"kind": "aot", "compute_capability": "SM89"} and dit.versions["tensorrt_rtx"] == rtx.version()
    assert len(dit.profiles) == 2 and dit.artifact["file"] == "engine.plan"
    assert "skipped" in dit.parity  # no GPU: built, not run
    assert (out / "dit" / "engine.plan").stat().st_size == dit.artifact["bytes"] > 0
    assert {r.key for r in results} == {"text_encoder", "dit", "vae_decoder/lone", "vae_decoder/single"}
    with pytest.raises(InputError, match="compute capability must be one of"):
        build_engines(root, tmp_path / "bad", "rtx", parse_buckets("64x64x9"), cache=EngineCache(tmp_path / "c2"),
                      compute_capability="SM01")


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_datacenter_tensorrt_builds_for_the_local_gpu(export_dir, tmp_path):
    pytest.importorskip("tensorrt", reason="datacenter TensorRT is not installable here (its wheels are stubs)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    root, model = export_dir
    results = build_engines(root, tmp_path / "trt", "trt", parse_buckets("64x64x9"), cache=EngineCache(tmp_path / "c"),
                            model=model)
    assert all(r.manifest.parity["ok"] for r in results)


@pytest.mark.slow
def test_cli_build_ls_verify(export_dir, tmp_path, capsys):
    from easyanimate_rt.cli import main

    root, _ = export_dir
    cache = tmp_path / "c"
    fresh = tmp_path / "fresh"
    assert main(["export", "tiny", "--out", str(fresh), "--networks", "text_encoder", "-q"]) == 0
    assert main(["build", str(fresh), "--out", str(tmp_path / "e"), "--backend", "ort-cpu", "--buckets",
                 "64x64x9", "--cache-dir", str(cache), "--threads", "1"]) == 2  # the export lacks the DiT
    assert "lacks the graphs" in capsys.readouterr().err
    # the module's export (its source: the saved model directory the CLI loads as reference)
    assert main(["build", str(root), "--out", str(tmp_path / "e"), "--backend", "ort-cpu", "--buckets",
                 "64x64x9", "--cache-dir", str(cache), "--threads", "1", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "dit" in printed and "onnx_fp32" in printed and "wrote" in printed
    assert main(["engines", "ls", str(tmp_path / "e")]) == 0 and "ort-cpu" in capsys.readouterr().out
    assert main(["engines", "verify", "--cache-dir", str(cache)]) == 0
    plan = next((tmp_path / "e" / "dit").glob("*.onnx"))
    plan.write_bytes(plan.read_bytes()[:100])
    assert main(["engines", "verify", str(tmp_path / "e")]) == 1
    assert "BAD" in capsys.readouterr().out
    assert main(["engines", "clean", "--cache-dir", str(cache), "--yes"]) == 0
    assert [p.name for p in cache.iterdir()] == ["CACHEDIR.TAG"]  # the mark stays with the (empty) cache
    assert (tmp_path / "e" / INDEX_NAME).is_file()


def test_check_network_is_what_a_load_runs(ort_build, export_dir, tmp_path, monkeypatch):
    import shutil

    from easyanimate_rt.engines.build import check_network

    out, _, _, _ = ort_build
    root, _ = export_dir
    m = check_network(out / "dit", root / "dit" / "model.onnx")
    assert m.key == "dit"
    d = tmp_path / "dit"
    shutil.copytree(out / "dit", d)
    other = tmp_path / "other.onnx"
    other.write_bytes((root / "dit" / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(EngineError, match="changed since the engine was built"):
        check_network(d, other)
    monkeypatch.setattr(ortb, "version", lambda: "9.9.9")
    with pytest.raises(EngineError, match="onnxruntime '.*' -> '9.9.9'"):
        check_network(d)
    monkeypatch.undo()
    (d / m.artifact["file"]).write_bytes(b"")
    with pytest.raises(EngineError, match="truncated or replaced"):
        check_network(d)
