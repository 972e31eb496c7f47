import pytest
import torch
from needs import require

from easyanimate_rt.errors import ShapeError
from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.reference.dit import MotionModule, VideoDiT
from easyanimate_rt.tolerances import check_close

TINY = from_preset("tiny").dit


def _inputs(b=1, frames=3, h=8, w=12, s=6, masked_from=4):
    x = torch.randn(b, TINY.in_channels, frames, h, w)
    t = torch.randint(0, 1000, (b,)).float()
    text = torch.randn(b, s, TINY.caption_channels)
    mask = torch.ones(b, s)
    mask[:, masked_from:] = 0
    return x, t, text, mask


def _randomise(module: torch.nn.Module, prefixes=("attn_temporal", "long_connect_fc")) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(k in name for k in prefixes) or name.startswith("proj_out"):
                p.normal_(0, 0.2)


@torch.no_grad()
def test_zero_init_video_model_is_image_model_per_frame():
    model = VideoDiT(TINY).eval()
    _randomise(model, prefixes=())  # only proj_out, so the output is not trivially zero
    x, t, text, mask = _inputs(frames=3)
    out = model(x, t, text, mask)
    per_frame = torch.cat([model(x[:, :, i:i + 1], t, text, mask) for i in range(3)], dim=2)
    assert out.shape == (1, TINY.out_channels, 3, 8, 12)
    assert out.abs().max() > 1e-3
    check_close(out, per_frame, "reference_exact")


@torch.no_grad()
def test_motion_module_mixes_frames_after_training():
    model = VideoDiT(TINY).eval()
    _randomise(model)
    x, t, text, mask = _inputs(frames=3)
    base = model(x, t, text, mask)
    x2 = x.clone()
    x2[:, :, 0] += torch.randn_like(x2[:, :, 0])
    moved = model(x2, t, text, mask)
    # Frames 1 and 2 move by a mean 0.021 (0.021..0.026 over seeds 0-2) against outputs of
    # mean size 0.94 there; frame 0 itself by up to 1.3.
    assert (moved[:, :, 1:] - base[:, :, 1:]).abs().mean() > 0.01
    # Control: the same change through the zero-initialised motion modules (and skips)
    # leaves the other frames exactly as they were.
    model = VideoDiT(TINY).eval()
    _randomise(model, prefixes=())
    assert torch.equal(model(x2, t, text, mask)[:, :, 1:], model(x, t, text, mask)[:, :, 1:])


def _motion(block_size: int, global_second: bool = False) -> MotionModule:
    mm = MotionModule(32, 2, 4, 16, block_size, global_second)
    with torch.no_grad():
        for p in mm.parameters():
            p.normal_(0, 0.3)
    # The per-frame GroupNorm couples all tokens of a frame through its statistics; take it
    # out so the tests see only the attention routing.
    mm.temporal_transformer.norm = torch.nn.Identity()
    return mm.eval()


@torch.no_grad()
@pytest.mark.parametrize("block_size", [1, 2])
def test_grid_reshape_reaches_2x2_neighbours_in_other_frames(block_size):
    frames, h, w = 3, 4, 4
    mm = _motion(block_size)
    x = torch.randn(frames, h * w, 32)                 # (B*F, L, D) with B = 1
    base = mm(x, frames, h, w)
    x2 = x.clone()
    x2[0, 0] += 3.0                                    # frame 0, token (0, 0)
    diff = (mm(x2, frames, h, w) - base).abs().amax(-1).reshape(frames, h, w)
    assert diff[1, 0, 0] > 1e-4                        # same location, other frame: always
    neighbour, far = diff[1, 0, 1], diff[1, 0, 2]      # same 2x2 cell / next cell
    assert far < 1e-6
    if block_size == 2:
        assert neighbour > 1e-4
    else:
        assert neighbour < 1e-6


@torch.no_grad()
def test_hybrid_global_attention_reaches_everywhere():
    frames, h, w = 2, 4, 4
    mm = _motion(1, global_second=True)
    x = torch.randn(frames, h * w, 32)
    x2 = x.clone()
    x2[0, 0] += 3.0
    diff = (mm(x2, frames, h, w) - mm(x, frames, h, w)).abs().amax(-1).reshape(frames, h, w)
    assert diff[1, 3, 3] > 1e-4


@torch.no_grad()
def test_text_mask_hides_padded_tokens():
    model = VideoDiT(TINY).eval()
    _randomise(model, prefixes=("attn2.to_out",))
    x, t, text, mask = _inputs(frames=2, masked_from=3)
    out = model(x, t, text, mask)
    text2 = text.clone()
    text2[:, 3:] = torch.randn_like(text2[:, 3:]) * 10
    check_close(model(x, t, text2, mask), out, "reference_exact")
    text3 = text.clone()
    text3[:, :3] += 1.0
    assert (model(x, t, text3, mask) - out).abs().max() > 1e-4


def _block_io(cfg):
    """A randomised DiT of ``cfg`` run once: (model, each block's input, each block's output)."""
    model = VideoDiT(cfg).eval()
    _randomise(model)
    outs, ins = {}, {}
    for i, blk in enumerate(model.transformer_blocks):
        blk.register_forward_pre_hook(lambda m, a, i=i: ins.__setitem__(i, a[0].clone()))
        blk.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, o.clone()))
    model(*_inputs(frames=2))
    return model, ins, outs


@torch.no_grad()
@pytest.mark.parametrize("cfg, plan, pairs, plain", [
    # ours: 2 skips at depth 6, 0 -> 5 and 1 -> 4; the middle blocks get none
    (TINY.replace(num_layers=6), (2, 4, 2), [(4, 1), (5, 0)], [3]),
    # upstream's at depth 17: 13 fc layers, blocks 0..12 kept, block 15 + k takes block 12 - k
    (TINY.replace(num_layers=17, skip_wiring="upstream"), (13, 15, 2), [(15, 12), (16, 11)], [13, 14]),
], ids=["symmetric", "upstream"])
def test_long_skips_wiring(cfg, plan, pairs, plain):
    """DiTConfig.skip_plan: block ``target`` adds long_connect_fc[target - first] of block
    ``source``'s output to its input; ``plain`` blocks take the previous output alone."""
    assert cfg.skip_plan == plan and cfg.num_skips == (13 if cfg.skip_wiring == "upstream" else plan[0])
    model, ins, outs = _block_io(cfg)
    for target, source in pairs:
        expected = outs[target - 1] + model.long_connect_fc[target - plan[1]](outs[source])
        check_close(ins[target], expected, "reference_exact")
    for i in plain:
        check_close(ins[i], outs[i - 1], "reference_exact")


def test_release_parameter_count():
    cfg = from_preset("v2-512").dit
    with torch.device("meta"):
        model = VideoDiT(cfg)
    learned = sum(p.numel() for p in model.parameters())
    assert abs(learned - 1.446e9) / 1.446e9 < 0.01, learned
    assert cfg.num_skips == 13
    assert "transformer_blocks.0.attn_temporal.temporal_transformer.transformer_blocks.0." \
           "attention_blocks.0.pos_encoder.pe" in model.state_dict()


def test_key_names_follow_upstream():
    keys = set(VideoDiT(TINY).state_dict())
    for k in ["pos_embed.proj.weight", "adaln_single.emb.timestep_embedder.linear_1.weight",
              "adaln_single.linear.weight", "caption_projection.linear_2.bias", "scale_shift_table",
              "proj_out.weight", "long_connect_fc.0.weight", "transformer_blocks.1.scale_shift_table",
              "transformer_blocks.1.attn1.to_out.0.weight", "transformer_blocks.1.attn2.to_k.bias",
              "transformer_blocks.1.ff.net.0.proj.weight", "transformer_blocks.1.ff.net.2.weight",
              "transformer_blocks.0.attn_temporal.temporal_transformer.norm.weight",
              "transformer_blocks.0.attn_temporal.temporal_transformer.proj_in.weight",
              "transformer_blocks.0.attn_temporal.temporal_transformer.transformer_blocks.0.ff_norm.weight",
              "transformer_blocks.0.attn_temporal.temporal_transformer.transformer_blocks.0.norms.1.bias",
              "transformer_blocks.0.attn_temporal.temporal_transformer.transformer_blocks.0."
              "attention_blocks.1.to_out.0.weight"]:
        assert k in keys, k
    assert not any(k.endswith("to_q.bias") and "attention_blocks" in k for k in keys)


def test_bad_latent_shape_is_named():
    model = VideoDiT(TINY.replace(temporal_block_size=2))
    with pytest.raises(ShapeError, match="multiple of 4"):
        model.check_input_shape((1, 4, 1, 8, 6))


@torch.no_grad()
@pytest.mark.parametrize("size", [(16, 24), (24, 8), (10, 14)])
def test_parity_with_diffusers_pixart(size):
    diffusers = require("diffusers")
    from easyanimate_rt.reference.weights import dit_config_from_pixart, load_pixart_backbone

    ref = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=3,
        sample_size=16, patch_size=2, caption_channels=24, cross_attention_dim=32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    cfg = dit_config_from_pixart(dict(ref.config), temporal_num_heads=2, motion_norm_groups=8)
    model = VideoDiT(cfg).eval()
    load_pixart_backbone(model, ref.state_dict())
    h, w = size
    x = torch.randn(2, 4, h, w)
    t = torch.tensor([3.0, 801.0])
    text = torch.randn(2, 7, 24)
    mask = torch.ones(2, 7)
    mask[1, 4:] = 0
    expected = ref(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                   return_dict=False)[0]
    actual = model(x[:, :, None], t, text, mask)[:, :, 0]
    check_close(actual, expected, "reference_exact")
