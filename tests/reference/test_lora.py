"""LoRA formats and merge (issue 27): numbers against hand computation, no drift over
many switches, kohya == PEFT, weight 0 == base, and every bad-input rule."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from exported import build_model
from safetensors.torch import save_file
from torch import nn

from easyanimate_rt.errors import CheckpointError, InputError
from easyanimate_rt.reference.lora import (
    Adapter,
    LoraMerger,
    lora_targets,
    merge_loras,
    merged_state,
    read_lora,
    save_kohya,
    unmerge_loras,
)

Q = "dit.transformer_blocks.0.attn1.to_q"
MOTION = "dit.transformer_blocks.0.attn_temporal.temporal_transformer.proj_in"
T5_Q = "text_encoder.encoder.block.0.layer.0.SelfAttention.q"


@pytest.fixture(scope="module")
def shared_model():
    return build_model("tiny")


@pytest.fixture
def model(shared_model):
    """The shared tiny model, put back to its exact weights after each test."""
    snapshot = {k: v.clone() for k, v in shared_model.dit.state_dict().items()}
    t5 = {k: v.clone() for k, v in shared_model.text_encoder.state_dict().items()}
    yield shared_model
    vars(shared_model).pop("_lora_merger", None)
    shared_model.dit.load_state_dict(snapshot)
    shared_model.text_encoder.load_state_dict(t5)


def _layers(model, names, rank=2, seed=0, scale=0.05):
    """{qualified module: (down (r, in), up (out, r))} with random values."""
    g = torch.Generator().manual_seed(seed)
    targets = lora_targets(model, motion_module=True, text_encoder=True)
    out = {}
    for name in names:
        w = targets[name].weight
        out[name] = (torch.randn(rank, w.shape[1], generator=g) * scale,
                     torch.randn(w.shape[0], rank, generator=g) * scale)
    return out


def _kohya(tmp_path, model, names, name="a", rank=2, alpha=4.0, seed=0):
    path = save_kohya(tmp_path / f"{name}.safetensors", _layers(model, names, rank, seed), alpha, rank)
    return Adapter.open(path)


def _peft(path, layers, alpha=None, metadata_alpha=None):
    """The diffusers layout: transformer./text_encoder. + path + lora_A/lora_B."""
    prefix = {"dit": "transformer", "text_encoder": "text_encoder"}
    tensors = {}
    for qualified, (down, up) in layers.items():
        network, module = qualified.split(".", 1)
        key = f"{prefix[network]}.{module}"
        tensors[f"{key}.lora_A.weight"] = down.contiguous()
        tensors[f"{key}.lora_B.weight"] = up.contiguous()
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
    metadata = {"format": "pt"}
    if metadata_alpha is not None:
        metadata["lora_adapter_metadata"] = json.dumps({"transformer.r": 2, "transformer.lora_alpha": metadata_alpha,
                                                        "text_encoder.lora_alpha": metadata_alpha})
    save_file(tensors, str(path), metadata=metadata)
    return path


def _param(model, qualified):
    network, name = qualified.split(".", 1)
    root = model.dit if network == "dit" else model.text_encoder.model
    return root.get_submodule(name).weight


@torch.no_grad()
def _dit_out(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 8, 8, generator=g)
    emb, mask = model.text_encoder.encode(["a red circle moving left"])
    return emb, model.dit(x, torch.tensor([500.0]), emb, mask)


# --- merge math ----------------------------------------------------------------------------

def test_merge_matches_hand_computed_linear(model, tmp_path):
    down, up = _layers(model, [Q], rank=3, seed=1, scale=0.3)[Q]
    path = save_kohya(tmp_path / "q.safetensors", {Q: (down, up)}, alpha=6.0, rank=3)
    base = _param(model, Q).detach().clone()
    reports = merge_loras(model, [Adapter.open(path, 0.7)])

    # W'[o, i] = W[o, i] + 0.7 * (6 / 3) * sum_r up[o, r] down[r, i], written out by hand
    expected = base.clone()
    for o in range(base.shape[0]):
        for i in range(base.shape[1]):
            expected[o, i] += 0.7 * 2.0 * sum(up[o, r] * down[r, i] for r in range(3))
    torch.testing.assert_close(_param(model, Q), expected, rtol=0, atol=1e-6)
    assert not torch.equal(_param(model, Q), base)

    # and equals upstream's unmerged forward (LoRAModule.forward): y + m * scale * up(down(x))
    layer = model.dit.get_submodule(Q.split(".", 1)[1])
    x = torch.randn(5, base.shape[1])
    with torch.no_grad():
        ref = x @ base.T + layer.bias + 0.7 * 2.0 * (x @ down.T) @ up.T
        torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)
    (r,) = reports
    assert (r.format, r.total, len(r.matched), r.unmatched, r.modules) == ("kohya", 3, 3, (), (Q,))


def test_two_adapters_at_once_are_the_sum(model, tmp_path):
    a = _kohya(tmp_path, model, [Q, MOTION], "a", seed=1)
    b = _kohya(tmp_path, model, [Q, T5_Q], "b", rank=3, alpha=1.5, seed=2)
    base = {n: _param(model, n).detach().clone() for n in (Q, MOTION, T5_Q)}
    one_a = merged_state(model, [a.with_weight(0.8)])
    one_b = merged_state(model, [b.with_weight(-0.4)])
    both = merge_loras(model, [a.with_weight(0.8), b.with_weight(-0.4)])
    assert [set(r.modules) for r in both] == [{Q, MOTION}, {Q, T5_Q}]
    for n in (Q, MOTION, T5_Q):
        delta = sum(s[f"{n}.weight"] - base[n] for s in (one_a, one_b) if f"{n}.weight" in s)
        torch.testing.assert_close(_param(model, n) - base[n], delta, rtol=0, atol=1e-7)
    # the shared module holds exactly base + both products, in float32
    la, lb = (next(x for x in read_lora(f).layers if x.name == "transformer_blocks_0_attn1_to_q") for f in (a, b))
    exp = base[Q] + 0.8 * (4.0 / 2) * (la.up @ la.down) + (-0.4) * (1.5 / 3) * (lb.up @ lb.down)
    torch.testing.assert_close(_param(model, Q), exp, rtol=0, atol=1e-7)


def test_switching_100_times_never_drifts(model, tmp_path):
    names = [Q, MOTION, T5_Q, "dit.proj_out"]
    a = _kohya(tmp_path, model, names, "a", seed=1)
    b = _kohya(tmp_path, model, names[:2], "b", seed=2)
    base_dit = {k: v.clone() for k, v in model.dit.state_dict().items()}
    base_t5 = {k: v.clone() for k, v in model.text_encoder.state_dict().items()}
    merger = LoraMerger(model)
    merger.merge([a])
    first_a = _param(model, Q).clone()
    sets = [[a], [b.with_weight(0.3)], [a.with_weight(1.7), b], [], [b, a.with_weight(-2.0)]]
    for i in range(100):
        merger.merge(sets[i % len(sets)])
        if i % len(sets) == 0:
            assert torch.equal(_param(model, Q), first_a)
    merger.unmerge()
    assert all(torch.equal(v, base_dit[k]) for k, v in model.dit.state_dict().items())
    assert all(torch.equal(v, base_t5[k]) for k, v in model.text_encoder.state_dict().items())


def test_weight_zero_is_the_base_model_exactly(model, tmp_path):
    base_emb, base_eps = _dit_out(model)
    a = _kohya(tmp_path, model, list(lora_targets(model, motion_module=True, text_encoder=True)), "all")
    merge_loras(model, [a.with_weight(0.0)])
    emb, eps = _dit_out(model)
    assert torch.equal(emb, base_emb) and torch.equal(eps, base_eps)
    merge_loras(model, [a])
    assert not torch.equal(_dit_out(model)[1], base_eps)
    merge_loras(model, [])
    assert torch.equal(_dit_out(model)[1], base_eps)


def test_kohya_and_peft_files_give_the_same_model(model, tmp_path):
    names = [Q, MOTION, "dit.transformer_blocks.1.ff.net.0.proj", T5_Q]
    layers = _layers(model, names, rank=2, seed=3)
    kohya = Adapter.open(save_kohya(tmp_path / "k.safetensors", layers, alpha=4.0, rank=2), 0.6)
    peft_alpha = Adapter.open(_peft(tmp_path / "p1.safetensors", layers, alpha=4.0), 0.6)
    peft_meta = Adapter.open(_peft(tmp_path / "p2.safetensors", layers, metadata_alpha=4.0), 0.6)
    ref = merged_state(model, [kohya])
    assert sorted(ref) == sorted(f"{n}.weight" for n in names)
    for other in (peft_alpha, peft_meta):
        state = merged_state(model, [other])
        assert sorted(state) == sorted(ref)
        assert max(float((state[k] - ref[k]).abs().max()) for k in ref) == 0.0
    assert read_lora(peft_alpha).format == "peft"

    # PEFT without alpha: alpha = rank, scale 1 -- the same as kohya with alpha = rank or none
    plain = Adapter.open(_peft(tmp_path / "p3.safetensors", layers), 0.6)
    kohya_r = Adapter.open(save_kohya(tmp_path / "k2.safetensors", layers, alpha=2.0, rank=2), 0.6)
    s1, s2 = merged_state(model, [plain]), merged_state(model, [kohya_r])
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_merged_state_leaves_the_model_alone_and_equals_merge(model, tmp_path):
    a = _kohya(tmp_path, model, [Q, T5_Q], "a")
    before = _param(model, Q).clone()
    state = merged_state(model, [a.with_weight(0.5)])
    assert torch.equal(_param(model, Q), before)
    merge_loras(model, [a.with_weight(0.5)])
    assert sorted(state) == [f"{Q}.weight", f"{T5_Q}.weight"]
    assert all(torch.equal(state[k], _param(model, k.rsplit(".", 1)[0])) for k in state)
    # with a set merged, merged_state still starts from the kept base
    assert torch.equal(merged_state(model, [a.with_weight(0.0)])[f"{Q}.weight"], before)


def test_motion_module_is_touched_only_when_the_file_names_it(model, tmp_path):
    motion = [n for n in lora_targets(model, motion_module=True) if "attn_temporal" in n]
    assert motion and not any("attn_temporal" in n for n in lora_targets(model))
    base = {n: _param(model, n).clone() for n in motion}
    merger = LoraMerger(model)
    merger.merge([_kohya(tmp_path, model, list(lora_targets(model)), "spatial")])
    assert all(torch.equal(_param(model, n), base[n]) for n in motion)
    assert not any("attn_temporal" in n for n in merger._base)
    merger.merge([_kohya(tmp_path, model, motion[:3], "motion", seed=5)])
    assert all(not torch.equal(_param(model, n), base[n]) for n in motion[:3])
    assert all(torch.equal(_param(model, n), base[n]) for n in motion[3:])


def test_upstream_spellings_and_report(model, tmp_path):
    """Upstream writes lora_unet__<path> (two underscores) and a bf16 0-d alpha; one
    underscore is also read. Keys naming no module are reported, not fatal."""
    down, up = _layers(model, [Q], rank=4)[Q]
    t5_down, t5_up = _layers(model, [T5_Q], rank=4)[T5_Q]
    tensors = {
        "lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight": down.bfloat16(),
        "lora_unet__transformer_blocks_0_attn1_to_q.lora_up.weight": up.bfloat16(),
        "lora_unet__transformer_blocks_0_attn1_to_q.alpha": torch.tensor(2.0, dtype=torch.bfloat16),
        "lora_unet_proj_out.lora_down.weight": _layers(model, ["dit.proj_out"], 4)["dit.proj_out"][0],
        "lora_unet_proj_out.lora_up.weight": _layers(model, ["dit.proj_out"], 4)["dit.proj_out"][1],
        "lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": t5_down,
        "lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": t5_up,
        "lora_unet__no_such_module.lora_down.weight": down,
        "lora_unet__no_such_module.lora_up.weight": up,
        "something_else": torch.zeros(1),
    }
    save_file(tensors, str(tmp_path / "up.safetensors"))
    base = _param(model, Q).clone()
    (r,) = merge_loras(model, [Adapter.open(tmp_path / "up.safetensors", 0.55)])
    assert r.total == 10 and len(r.matched) == 7
    assert r.unmatched == ("lora_unet__no_such_module.lora_down.weight", "lora_unet__no_such_module.lora_up.weight",
                           "something_else")
    assert set(r.modules) == {Q, "dit.proj_out", T5_Q}
    exp = base + 0.55 * (2.0 / 4) * (up.bfloat16().float() @ down.bfloat16().float())
    torch.testing.assert_close(_param(model, Q), exp, rtol=0, atol=1e-7)


def test_save_kohya_names_as_upstream(model, tmp_path):
    path = save_kohya(tmp_path / "k.safetensors", _layers(model, [Q, T5_Q], rank=2), alpha=1.0, rank=2)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["ss_network_dim"] == "2"
    assert keys == {f"{stem}.{part}" for stem in ("lora_unet__transformer_blocks_0_attn1_to_q",
                                                 "lora_te_encoder_block_0_layer_0_SelfAttention_q")
                    for part in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert not list(tmp_path.glob("*.tmp"))


def test_conv_1x1_takes_4d_lora_tensors(tmp_path):
    """Upstream squeezes (O, R, 1, 1) @ (R, I, 1, 1) for 1x1 convolutions."""
    torch.manual_seed(0)
    toy = SimpleNamespace(dit=nn.Sequential(nn.Conv2d(6, 5, 1), nn.Conv2d(5, 5, 3)),
                          text_encoder=SimpleNamespace(model=nn.Linear(2, 2)))
    down, up = torch.randn(2, 6, 1, 1), torch.randn(5, 2, 1, 1)
    save_file({"lora_unet__0.lora_down.weight": down, "lora_unet__0.lora_up.weight": up,
               "lora_unet__0.alpha": torch.tensor(1.0)}, str(tmp_path / "c.safetensors"))
    base = toy.dit[0].weight.detach().clone()
    merge_loras(toy, [Adapter.open(tmp_path / "c.safetensors", 2.0)])
    exp = base + 2.0 * 0.5 * (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
    torch.testing.assert_close(toy.dit[0].weight, exp, rtol=0, atol=1e-6)
    unmerge_loras(toy)
    assert torch.equal(toy.dit[0].weight, base)
    # a 3x3 convolution takes no LoRA
    save_file({"lora_unet__1.lora_down.weight": torch.randn(2, 5, 3, 3),
               "lora_unet__1.lora_up.weight": torch.randn(5, 2, 1, 1)}, str(tmp_path / "c3.safetensors"))
    with pytest.raises(CheckpointError, match="Linear or 1x1 convolution.*Conv2d"):
        merge_loras(toy, [Adapter.open(tmp_path / "c3.safetensors")])


# --- the adapter spec and bad input --------------------------------------------------------

def test_parse_path_and_weight(model, tmp_path):
    a = _kohya(tmp_path, model, [Q], "a")
    assert Adapter.parse(str(a.path)) == a
    assert Adapter.parse(f"{a.path}:0.55") == a.with_weight(0.55)
    assert Adapter.parse(f"{a.path}:-1e-1").weight == -0.1
    odd = tmp_path / "odd:0.5"  # an existing file whose name has ':' wins over the weight syntax
    shutil.copy(a.path, odd)
    assert Adapter.parse(str(odd)) == Adapter(odd, 1.0, a.sha256)
    assert Adapter.parse(f"{odd}:2").weight == 2.0


@pytest.mark.parametrize("bad, message", [
    (":abc", r"LoRA weight must be a number \(PATH\[:WEIGHT\]\), got 'abc'"),
    (":nan", r"LoRA weight must be finite, got nan"),
    (":inf", r"LoRA weight must be finite, got inf"),
    (":-inf", r"LoRA weight must be finite, got -inf"),
])
def test_bad_weight(model, tmp_path, bad, message):
    a = _kohya(tmp_path, model, [Q], "a")
    with pytest.raises(InputError, match=message):
        Adapter.parse(f"{a.path}{bad}")


def test_bad_weight_in_code(model, tmp_path):
    a = _kohya(tmp_path, model, [Q], "a")
    with pytest.raises(InputError, match="must be finite, got nan"):
        a.with_weight(float("nan"))
    with pytest.raises(InputError, match="must be a number, got '1'"):
        Adapter.open(a.path, "1")
    with pytest.raises(InputError, match="sha256 must be 64"):
        Adapter(a.path, 1.0, "abc")


def test_missing_truncated_and_foreign_files(model, tmp_path):
    with pytest.raises(InputError, match="LoRA file not found: .*nope.safetensors"):
        Adapter.parse(str(tmp_path / "nope.safetensors:0.5"))
    with pytest.raises(InputError, match="LoRA file not found: .*nope:x"):
        Adapter.parse(str(tmp_path / "nope:x"))
    a = _kohya(tmp_path, model, [Q, T5_Q], "a")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(a.path.read_bytes()[:-50])
    with pytest.raises(CheckpointError, match="complete safetensors file, .*cut.safetensors is not"):
        Adapter.parse(str(cut))
    text = tmp_path / "lora.pt"
    text.write_text("not a safetensors file at all")
    with pytest.raises(CheckpointError, match="complete safetensors file, .*lora.pt is not"):
        Adapter.parse(str(text))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="complete safetensors file"):
        Adapter.open(empty)


def test_nan_and_inf_tensors(model, tmp_path):
    down, up = _layers(model, [Q])[Q]
    for bad in (float("nan"), float("inf")):
        up = up.clone()
        up[0, 0] = bad
        save_file({"lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                   "lora_unet__transformer_blocks_0_attn1_to_q.lora_up.weight": up}, str(tmp_path / "n.safetensors"))
        with pytest.raises(CheckpointError, match=r"LoRA tensors must be finite, .*n.safetensors: "
                                                  r"lora_unet__transformer_blocks_0_attn1_to_q.lora_up.weight has 1 "
                                                  r"NaN/inf value\(s\) of 64"):
            Adapter.open(tmp_path / "n.safetensors")


def test_same_lora_twice(model, tmp_path):
    a = _kohya(tmp_path, model, [Q], "a")
    copy = tmp_path / "copy.safetensors"
    shutil.copy(a.path, copy)
    base = _param(model, Q).clone()
    for pair in ([a, a.with_weight(0.5)], [a, Adapter.open(copy)]):
        with pytest.raises(InputError, match=r"the same LoRA may be given only once, got .*a.safetensors and "):
            merge_loras(model, pair)
    assert torch.equal(_param(model, Q), base)  # nothing merged


def test_file_matching_no_module(model, tmp_path):
    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2), "model.x.lora_B.weight": torch.zeros(2, 2)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"matches no module of this model: .*other.safetensors \(2 keys, "
                                              r"e.g. model.x.lora_B.weight\); expected keys starting with "
                                              r"lora_unet_, lora_te_, transformer., text_encoder."):
        merge_loras(model, [Adapter.open(tmp_path / "other.safetensors")])


def test_lora_for_another_model_size(model, tmp_path):
    bigger = {Q: (torch.randn(4, 48), torch.randn(48, 4)), "dit.proj_out": _layers(model, ["dit.proj_out"], 4)
              ["dit.proj_out"]}
    path = save_kohya(tmp_path / "big.safetensors", bigger, alpha=4, rank=4)
    base = {n: _param(model, n).clone() for n in (Q, "dit.proj_out")}
    with pytest.raises(CheckpointError, match=r"LoRA shapes must fit the model, .*big.safetensors: "
                                              r"lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight "
                                              r"is \(4, 48\) "
                                              r"but dit.transformer_blocks.0.attn1.to_q.weight \(32, 32\) needs "
                                              r"\(4, 32\); a LoRA for another model size\?"):
        merge_loras(model, [Adapter.open(path)])
    assert all(torch.equal(_param(model, n), base[n]) for n in base)  # checked before any change


def test_half_a_layer_and_a_changed_file(model, tmp_path):
    down, _ = _layers(model, [Q])[Q]
    save_file({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": down}, str(tmp_path / "h.safetensors"))
    with pytest.raises(CheckpointError, match="need both down and up weights, .*transformer_blocks.0.attn1.to_q "
                                              "has .*lora_A.weight but no up weight"):
        merge_loras(model, [Adapter.open(tmp_path / "h.safetensors")])
    a = _kohya(tmp_path, model, [Q], "a")
    _kohya(tmp_path, model, [Q], "a", seed=9)  # rewritten after it was named
    with pytest.raises(CheckpointError, match="changed since it was named"):
        merge_loras(model, [a])


def test_messages_are_one_line(model, tmp_path):
    a = _kohya(tmp_path, model, [Q], "a")
    for call in (lambda: Adapter.parse(f"{a.path}:x"), lambda: Adapter.parse(str(tmp_path / "none")),
                 lambda: merge_loras(model, [a, a])):
        with pytest.raises((InputError, CheckpointError)) as info:
            call()
        assert "\n" not in str(info.value)
