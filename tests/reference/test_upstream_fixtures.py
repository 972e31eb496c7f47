"""Our reference reproduces upstream EasyAnimate's own numbers: fixtures made by running
the public upstream code (V2 at fb0916f, V3 at f9eeabe) with random weights at small
widths (tests/fixtures/upstream/README.md), loaded here through our loader. Every
output must match upstream's within 1e-5 (float32), and the loader must refuse each
fixture under a preset of the other release or with a stray weight."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from easyanimate_rt.errors import CheckpointError
from easyanimate_rt.reference.upstream import dit_config, vae_config
from easyanimate_rt.reference.weights import load_dit, load_vae
from easyanimate_rt.tolerances import check_close

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "upstream"


def io(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "io.safetensors"))


def dit(name: str, preset: str):
    _, cfg = dit_config(FIXTURES / name, preset)
    return load_dit(FIXTURES / name, cfg).eval()


def vae(name: str, preset: str):
    _, cfg = vae_config(FIXTURES / name, preset)
    return load_vae(FIXTURES / name, cfg).eval()


def check(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, what
    assert expected.abs().max() > 0.1, what  # a non-trivial reference
    check_close(actual, expected, "reference_exact")


@torch.no_grad()
def _dit_out(model, t: dict[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    g = lambda k: t.get(prefix + k)  # noqa: E731
    return model(g("hidden_states"), g("timestep").float(), g("encoder_hidden_states"), g("encoder_attention_mask"),
                 g("inpaint_latents"), g("clip_encoder_hidden_states"), g("clip_attention_mask"))


def test_dit_v2_matches_upstream():
    """28 blocks, plain temporal attention (block_size 1), 8 temporal heads, U-ViT skips."""
    model = dit("dit-v2", "v2-512")
    cfg = model.config
    assert (cfg.num_layers, cfg.temporal_block_size, cfg.temporal_num_heads, cfg.hybrid_global_attention) == \
        (28, 1, 8, False)
    t = io("dit-v2")
    check(_dit_out(model, t), t["output"], "dit-v2")


@pytest.mark.parametrize("case", ["t2v_zero", "t2v", "i2v_early", "i2v"])
def test_dit_v3_inp_matches_upstream(case):
    """V3 InP: hybrid motion module (global attention in odd blocks), 16 temporal heads,
    12 input channels and the CLIP projection; text-to-video (zero and pipeline-built
    inpaint latents) and image-to-video (CLIP hidden at step 0, shown at step 1)."""
    model = dit("dit-v3-inp", "v3-512")
    cfg = model.config
    assert (cfg.inpaint_channels, cfg.clip_channels, cfg.temporal_num_heads, cfg.hybrid_global_attention) == \
        (8, 768, 16, True)
    t = io("dit-v3-inp")
    check(_dit_out(model, t, f"{case}."), t[f"{case}.output"], case)


@pytest.mark.parametrize("frames", [1, 8, 9, 16, 17, 25])
@torch.no_grad()
def test_vae_v3_slice_mode_matches_upstream(frames):
    model = vae("vae-v3", "v3-512")
    assert (model.config.slicing, model.config.padding_mode, model.config.mid_block_layers) == ("slice", "slice", 2)
    t, s = io("vae-v3"), model.config.scaling_factor
    mean, logvar = model.encode_posterior(t[f"video_{frames}"])
    check(mean, t[f"latents_{frames}"], f"encode {frames}")
    check(logvar, t[f"latents_logvar_{frames}"], f"logvar {frames}")
    check(model.encode(t[f"video_{frames}"]) / s, t[f"latents_{frames}"], f"scaled encode {frames}")
    check(model.decode(t[f"decode_in_{frames}"] * s), t[f"decode_out_{frames}"], f"decode {frames}")


@pytest.mark.parametrize("frames", [1, 9, 17, 18, 25])
@torch.no_grad()
def test_vae_v2_causal_chunks_match_upstream(frames):
    """9-frame chunks each encoded whole (-> 3 latents; 17 -> 3 + 2, 25 -> 3 + 3 + 2) and
    3-latent chunks each decoded whole (-> 9 frames, the chunk's first frame not doubled;
    2 latents -> 5)."""
    model = vae("vae-v2", "v2-512")
    assert (model.config.slicing, model.config.padding_mode) == ("chunk", "causal")
    t, s = io("vae-v2"), model.config.scaling_factor
    mean, logvar = model.encode_posterior(t[f"video_{frames}"])
    check(mean, t[f"latents_{frames}"], f"encode {frames}")
    check(logvar, t[f"latents_logvar_{frames}"], f"logvar {frames}")
    decoded = model.decode(t[f"decode_in_{frames}"] * s)
    check(decoded, t[f"decode_out_{frames}"], f"decode {frames}")


@pytest.mark.parametrize("name, loader, wrong, match", [
    ("dit-v2", dit_config, "v3-512", "inpaint_channels: file 0, preset 8"),
    ("dit-v3-inp", dit_config, "v2-512", "inpaint_channels: file 8, preset 0"),
    ("vae-v2", vae_config, "v3-512", "slicing: file 'chunk', preset 'slice'"),
    ("vae-v3", vae_config, "v2-512", "slicing: file 'slice', preset 'chunk'"),
])
def test_a_fixture_under_the_other_release_is_refused(name, loader, wrong, match):
    with pytest.raises(CheckpointError, match=f"describes another release than preset '{wrong}'.*{match}"):
        loader(FIXTURES / name, wrong)


@pytest.mark.parametrize("name, sub, preset", [("dit-v3-inp", "transformer", "v3-512"), ("vae-v2", "vae", "v2-512")])
def test_a_stray_weight_in_a_fixture_is_refused(tmp_path, name, sub, preset):
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    weights = root / sub / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["transformer_blocks.28.attn1.to_q.weight" if sub == "transformer" else "encoder.extra.weight"] = \
        torch.zeros(2, 2)
    save_file(state, str(weights))
    if sub == "transformer":
        with pytest.raises(CheckpointError, match=r"1 weights the model does not .*transformer_blocks\.28"):
            load_dit(root, dit_config(root, preset)[1])
    else:
        with pytest.raises(CheckpointError, match=r"1 weights the model does not .*encoder\.extra\.weight"):
            load_vae(root, vae_config(root, preset)[1])


def test_missing_position_tables_are_computed_like_upstream():
    """The fixtures leave out the motion modules' pos_encoder.pe (upstream rebuilds them
    and loads with strict=False); a missing weight of any other kind is still an error."""
    state = load_file(str(FIXTURES / "dit-v2" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert not any(k.endswith("pos_encoder.pe") for k in state)
    model = dit("dit-v2", "v2-512")
    pe = model.transformer_blocks[0].attn_temporal.temporal_transformer.transformer_blocks[0] \
        .attention_blocks[0].pos_encoder.pe
    assert pe.shape == (1, 4096, 32) and torch.isfinite(pe).all() and pe[0, 1, 0] == pytest.approx(0.8414710)
