from easyanimate_rt.cli import main, model_info


def test_info_counts_release_parameters():
    info = model_info("v2-512", 512, 512, 144)
    assert abs(info["dit_params"] - 1.446e9) / 1.446e9 < 0.01
    assert info["latent_frames"] == 36
    assert info["tokens"] == 36 * 32 * 32  # 36,864 (DESIGN.md 1.3)
    assert abs(info["motion_module_params"] - 818e6) / 818e6 < 0.01


def test_generate_writes_a_video(tmp_path, capsys):
    out = tmp_path / "v.gif"
    code = main(["generate", "a red circle", "--model", "tiny", "--height", "32", "--width", "32",
                 "--frames", "9", "--steps", "2", "--out", str(out), "-q"])
    assert code == 0 and out.stat().st_size > 0
    assert "random weights" in capsys.readouterr().out


def test_bad_request_exits_2_with_the_rule(tmp_path, capsys):
    code = main(["generate", "x", "--model", "tiny", "--height", "40", "--out", str(tmp_path / "v.mp4")])
    assert code == 2
    assert "height must be a positive multiple of 16, got 40" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()
