"""The README's quick start is what CI runs."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from easyanimate_rt.media import read_video

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    assert "generate" in commands[0]
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_quick_start_generates_on_the_runtime(tmp_path):
    """The README's first command after its install: the first run builds the shipped
    model's engines (showing each stage), the second loads them and builds nothing."""
    command = _quick_start_commands()[0].split("&&")[-1].strip()
    args = shlex.split(command)
    assert args[0].endswith("easyanimate-rt") and args[1] == "generate"
    exe = [sys.executable, "-m", "easyanimate_rt", *args[1:]]
    first = subprocess.run(exe, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "first use: exporting and building engines" in first.stderr and "export dit" in first.stderr
    assert "on ort" in first.stdout
    frames, fps = read_video(tmp_path / "video.mp4")
    assert frames.shape == (17, 64, 64, 3) and fps == 8
    (tmp_path / "video.mp4").unlink()
    second = subprocess.run(exe, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0 and "first use" not in second.stderr, second.stderr
    assert read_video(tmp_path / "video.mp4")[0].shape == (17, 64, 64, 3)
