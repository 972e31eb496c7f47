"""Bad input through the CLI as a user meets it: a subprocess, exit code 2 (130 for
Ctrl-C), one line naming the rule and the value, no traceback, no output file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from easyanimate_rt.cli import default_model

SHIPPED = Path(default_model())


def cli(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "easyanimate_rt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


@pytest.fixture
def out(tmp_path):
    return tmp_path / "video.mp4"


def refused(result, rule: str, out: Path) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert rule in result.stderr, result.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]  # no temporary file


def broken_model(tmp_path: Path, what: str) -> Path:
    model = tmp_path / "model"
    shutil.copytree(SHIPPED, model)
    if what == "config":
        (model / "easyanimate_rt.json").write_text("{ not json")
    elif what == "weights":
        weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    return model


CASES = [
    (["--height", "40"], "height must be a positive multiple of 32, got 40"),
    (["--width", "0"], "width must be a positive multiple of 32, got 0"),
    (["--frames", "10"], "frames"),
    (["--frames", "-8"], "frames"),
    (["--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["--steps", "5000"], "num_steps must be an integer in [1, 1000], got 5000"),
    (["--guidance-scale", "nan"], "guidance_scale must be a finite number in [0, 100.0], got nan"),
    (["--guidance-scale", "inf"], "guidance_scale must be a finite number in [0, 100.0], got inf"),
    (["--guidance-scale", "-1"], "guidance_scale must be a finite number in [0, 100.0], got -1.0"),
    (["--guidance-scale", "1e6"], "guidance_scale must be a finite number in [0, 100.0], got 1000000.0"),
    (["--seed", "-1"], "seed must be an integer in [0, 2**64), got -1"),
    (["--seed", str(2**64)], "seed must be an integer in [0, 2**64), got 18446744073709551616"),
    (["--seed", "abc"], "seed must be an integer, got 'abc'"),
    (["--sampler", "heun"], "unknown sampler 'heun'"),
    (["--decode", "blurry"], "decode must be one of ['plain', 'smooth'], got 'blurry'"),
    (["--guidance-mode", "both"], "invalid choice: 'both'"),
    (["--backend", "trt9"], "backend for text_encoder must be one of"),
    (["--backend", "unet=ort"], "unknown network 'unet'"),
    (["--precision", "int4"], "backend ort-cpu runs ['fp32', 'fp16']; got precision 'int4'"),
    (["--backend", "trt"], "tensorrt is required for --backend trt"),
    (["--backend", "dit=ort-cuda"], "needs ONNX Runtime's CUDAExecutionProvider"),
    (["--max-tokens", "10"], "over the limit of 10 (--max-tokens)"),
    (["--height", "2048", "--width", "2048", "--frames", "1440"], "GiB are available"),
    (["--device", "cuda"], "--device cuda: no CUDA device is visible"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda[:N], got 'tpu'"),
    (["--model", "/no/such/model"], "model directory not found: /no/such/model"),
    (["--model", "v9-1024"], "unknown preset 'v9-1024'"),
    (["--image", "/no/such/image.png"], "not found"),
    (["--cache", "magic"], "invalid choice: 'magic'"),
    (["--cache", "fbcache", "--cache-threshold", "-0.5"], "step cache threshold must be a finite number >= 0, got -0.5"),
    (["--cache-threshold", "0.1"], "--cache-threshold 0.1 needs a policy: --cache fbcache or teacache"),
    (["--cache", "teacache", "--backend", "reference"], "step caching runs on the runtime, not on --backend reference"),
    (["--backend", "dit=ort,dit=torch"], "network 'dit' is named twice"),
    (["--model", "tiny", "--height", "16", "--width", "16", "--frames", "1"],
     "16x16 is one DiT token per frame, too small for this model's motion module"),
    (["--sampler", "ddim", "--steps", "1000"], "use at most 999 steps"),
]


@pytest.mark.parametrize("args,rule", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_request_is_refused_before_any_work(args, rule, out):
    t0 = time.perf_counter()
    result = cli("generate", "a red circle moving left", *args, "--out", out)
    refused(result, rule, out)
    assert time.perf_counter() - t0 < 30  # refused up front, not after building engines


@pytest.mark.parametrize("name,rule", [("video.avi", "output file must end in one of ['.mp4', '.gif', '.png']"),
                                       ("a-file/video.mp4", "is not a writable directory"),
                                       ("folder.mp4", "is a directory")])
def test_bad_output_path_is_refused_before_any_work(tmp_path, name, rule):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "folder.mp4").mkdir()
    target = tmp_path / name
    result = cli("generate", "a red circle", "--out", target)
    assert result.returncode == 2 and rule in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "video.avi").exists() and not (tmp_path / "folder.mp4" / "video.mp4").exists()


def test_a_corrupt_config_names_the_file(tmp_path, out):
    model = broken_model(tmp_path, "config")
    refused(cli("generate", "x", "--model", model, "--out", out), "easyanimate_rt.json is not a valid model config",
            out)


def test_truncated_weights_name_the_file(tmp_path, out):
    model = broken_model(tmp_path, "weights")
    result = cli("generate", "x", "--model", model, "--out", out, "--cache-dir", tmp_path / "cache")
    refused(result, "diffusion_pytorch_model.safetensors is not a readable safetensors file", out)


def test_image_to_video_needs_an_inp_model(tmp_path, out):
    import numpy as np

    from easyanimate_rt.media import save_video

    image = save_video(np.zeros((1, 64, 64, 3), np.uint8), tmp_path / "start.png", 8)
    refused(cli("generate", "x", "--image", image, "--out", out), "image-to-video needs an InP model", out)


def test_unexpected_errors_are_one_line_with_a_hint(monkeypatch, capsys, out):
    """A bug (here: the video writer failing) is exit 1, one line and a hint; -v adds the
    traceback. Neither leaves a file."""
    from easyanimate_rt import cli as cli_module
    from easyanimate_rt import media

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(media.VideoWriter, "write", broken)
    args = ["generate", "a red circle", "--backend", "reference", "--steps", "1", "--out", str(out), "-q"]
    assert cli_module.main(args) == 1
    err = capsys.readouterr().err
    assert "error: unexpected RuntimeError: disk on fire" in err and "hint: rerun with -v" in err
    assert "Traceback" not in err and not out.exists()
    assert cli_module.main(["-v", *args]) == 1
    assert "Traceback" in capsys.readouterr().err and not out.exists()


def interrupt_when(args, marker: str, tmp_path, out, delay: float = 0.0):
    """Start the CLI, send SIGINT once ``marker`` shows on stderr (after ``delay``)."""
    # SIGINT's default disposition in the child: started from a background shell (which
    # ignores SIGINT, and children inherit that), Python would install no Ctrl-C handler.
    proc = subprocess.Popen([sys.executable, "-m", "easyanimate_rt", *map(str, args)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = threading.Event()
    lines: list[str] = []

    def read():
        for chunk in iter(lambda: proc.stderr.read(1), ""):
            lines.append(chunk)
            if marker in "".join(lines[-200:]):
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert seen.wait(120) or marker == "", "".join(lines)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    reader.join(10)
    return proc.returncode, "".join(lines)


def test_ctrl_c_during_denoising_exits_130_and_leaves_no_file(tmp_path, out):
    code, err = interrupt_when(["generate", "a red circle", "--model", "tiny", "--backend", "torch", "--steps", "1000",
                                "--height", "32", "--width", "32", "--frames", "9", "--out", out,
                                "--cache-dir", tmp_path / "c"], "denoising:", tmp_path, out, delay=0.5)
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err
    assert not out.exists() and not list(tmp_path.glob(".video.mp4.*"))


def test_ctrl_c_during_start_up_exits_130(tmp_path, out):
    code, err = interrupt_when(["generate", "a red circle", "--model", "tiny", "--backend", "torch", "--out", out],
                               "", tmp_path, out, delay=0.4)
    assert code == 130 and "Traceback" not in err, err
    assert not out.exists()


def test_empty_prompt_and_an_over_long_prompt(tmp_path):
    """Both run (on the reference backend: no engine build in this test); the long one
    says how many tokens were kept."""
    out = tmp_path / "v.png"
    result = cli("generate", "", "--backend", "reference", "--steps", "2", "--out", out, "-q")
    assert result.returncode == 0, result.stderr
    long = cli("generate", "a red circle moving left " * 20, "--backend", "reference", "--steps", "2", "--out", out,
               "-q")
    assert long.returncode == 0 and "so the first 23 were kept" in long.stderr, long.stderr
