"""Fixtures for the data-pipeline tests: synthetic videos made once per session."""

from __future__ import annotations

import pytest
from needs import require


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> dict:
    require("cv2")
    from data_synth import PAN_PX_PER_FRAME, cut_video_frames, pan_frames, text_frames, write_video

    root = tmp_path_factory.mktemp("synth")
    raw = root / "raw"
    raw.mkdir()
    clips = root / "clips"
    clips.mkdir()
    out: dict = {"root": root, "raw": raw}
    out["cuts"] = write_video(raw / "cuts.mp4", cut_video_frames())
    out["static"] = write_video(clips / "static.mp4", pan_frames(0))
    out["pan"] = write_video(clips / "pan.mp4", pan_frames(PAN_PX_PER_FRAME))
    frames, area = text_frames(True)
    out["text"] = write_video(clips / "text.mp4", frames)
    out["text_area"] = area
    out["notext"] = write_video(clips / "notext.mp4", text_frames(False)[0])
    return out
