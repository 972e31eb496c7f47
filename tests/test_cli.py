from easyanimate_rt.cli import main, model_info


def test_info_counts_release_parameters():
    info = model_info("v2-512", 512, 512, 144)
    assert abs(info["dit_params"] - 1.446e9) / 1.446e9 < 0.01
    assert info["latent_frames"] == 48  # V2's VAE: 9-frame chunks -> 3 latents each
    assert info["tokens"] == 48 * 32 * 32
    assert abs(info["motion_module_params"] - 818e6) / 818e6 < 0.01
    assert info["clip_params"] == 0
    v3 = model_info("v3-512", 512, 512, 144)
    assert v3["latent_frames"] == 36 and v3["tokens"] == 36 * 32 * 32  # 36,864 (DESIGN.md 1.3)
    # InP: a CLIP projection 768 -> 8 x 1152 -> 8 x 1152, and 8 more patch-embed input channels
    d = 1152 * 8
    assert v3["clip_params"] == 768 * d + d + d * d + d
    assert v3["dit_params"] == info["dit_params"] + v3["clip_params"] + 1152 * 8 * 2 * 2


def test_generate_writes_a_video(tmp_path, capsys):
    out = tmp_path / "v.gif"
    code = main(["generate", "a red circle", "--model", "tiny", "--backend", "torch", "--height", "32", "--width", "32",
                 "--frames", "9", "--steps", "2", "--out", str(out), "-q"])
    assert code == 0 and out.stat().st_size > 0
    assert "random weights" in capsys.readouterr().out


def test_bad_request_exits_2_with_the_rule(tmp_path, capsys):
    code = main(["generate", "x", "--model", "tiny", "--height", "40", "--out", str(tmp_path / "v.mp4")])
    assert code == 2
    assert "height must be a positive multiple of 16, got 40" in capsys.readouterr().err
    assert not (tmp_path / "v.mp4").exists()
