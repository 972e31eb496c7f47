import json
import math
import os
import signal
import socket

import pytest
import torch
import torch.multiprocessing as mp

from easyanimate_rt.errors import ConfigError
from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.reference.dit import VideoDiT
from easyanimate_rt.reference.samplers import NoiseSchedule
from easyanimate_rt.reference.vae import SliceVAE
from easyanimate_rt.reference.weights import random_model
from easyanimate_rt.shapes.world import ShapesDataset
from easyanimate_rt.train import common
from easyanimate_rt.train.common import (DistEnv, TrainingInterrupted, latest_checkpoint, load_checkpoint,
                                         save_checkpoint)
from easyanimate_rt.train.dit_trainer import DiTStage, DiTTrainConfig, train_dit
from easyanimate_rt.train.losses import LPIPS, DiffusionLoss, reconstruction_loss
from easyanimate_rt.train.vae_trainer import VAETrainConfig, train_vae

TINY = from_preset("tiny")


@pytest.fixture(scope="module")
def parts():
    return random_model(TINY, seed=0)


def _sources(stage: DiTStage):
    return (ShapesDataset(frames=1, size=stage.height, length=4, seed=1, still_fraction=1.0),
            ShapesDataset(frames=stage.frames, size=stage.height, length=4, seed=2))


def _dit_cfg(steps=(3, 3), **kw) -> DiTTrainConfig:
    stages = (DiTStage("images", steps[0], 32, 32, frames=1, lr=1e-3, batch_size=2),
              DiTStage("video", steps[1], 32, 32, frames=9, image_fraction=0.3, lr=1e-3, batch_size=2,
                       full_length_prob=0.5))
    base = dict(stages=stages, warmup_steps=2, cache_size=4, checkpoint_every=100, log_every=1,
                caption_dropout=0.3)
    return DiTTrainConfig(**{**base, **kw})


def _fresh_dit() -> VideoDiT:
    torch.manual_seed(11)
    return VideoDiT(TINY.dit)


def test_dit_loss_falls(parts, tmp_path):
    cfg = _dit_cfg(steps=(40, 1), caption_dropout=0.0)
    train_dit(_fresh_dit(), parts.vae, parts.text_encoder, _sources, cfg, tmp_path, progress=False)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[2]) for r in rows]          # the mse column
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_vae_loss_falls_and_gan_lpips_paths_run(tmp_path):
    torch.manual_seed(0)
    vae = SliceVAE(TINY.vae)
    stills = ShapesDataset(frames=1, size=16, length=2, seed=1, still_fraction=1.0)
    clips = ShapesDataset(frames=9, size=16, length=1, seed=2)
    cfg = VAETrainConfig(steps=30, batch_size=1, lr=2e-3, image_fraction=0.0, log_every=1, checkpoint_every=100)
    train_vae(vae, stills, clips, cfg, tmp_path / "a", progress=False)
    rows = (tmp_path / "a" / "metrics.csv").read_text().splitlines()[1:]
    l1 = [float(r.split(",")[2]) for r in rows]
    assert sum(l1[-5:]) / 5 < 0.7 * sum(l1[:5]) / 5, l1
    # GAN on from step 1 and LPIPS with locally supplied (here random) weights
    lpips_file = tmp_path / "lpips.pt"
    torch.save(_random_lpips_state(), lpips_file)
    cfg = VAETrainConfig(steps=2, batch_size=1, gan_start=1, lpips_path=str(lpips_file), log_every=1)
    train_vae(vae, stills, clips, cfg, tmp_path / "b", progress=False)
    header = (tmp_path / "b" / "metrics.csv").read_text().splitlines()[0]
    assert "lpips" in header and "d_loss" in header


def _random_lpips_state():
    class _Holder(LPIPS):
        def __init__(self):  # build the modules without loading a file
            torch.nn.Module.__init__(self)

    state = {}
    convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
             (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    idx = 0
    for spec in ["C", "C", "M", "C", "C", "M", "C", "C", "C", "M", "C", "C", "C", "M", "C", "C", "C"]:
        if spec == "M":
            idx += 1
            continue
        cin, cout = convs.pop(0)
        state[f"net.features.{idx}.weight"] = torch.randn(cout, cin, 3, 3) * 0.05
        state[f"net.features.{idx}.bias"] = torch.zeros(cout)
        idx += 2
    for k, c in enumerate((64, 128, 256, 512, 512)):
        state[f"lins.{k}.weight"] = torch.rand(1, c, 1, 1) * 0.1
    return state


def test_lpips_is_zero_on_identical_and_positive_otherwise(tmp_path):
    path = tmp_path / "lpips.pt"
    torch.save(_random_lpips_state(), path)
    lp = LPIPS(path)
    a = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(lp(a, a)) == 0.0
    assert float(lp(a, a.flip(-1))) > 0.0


def test_resume_is_exact(parts, tmp_path, monkeypatch):
    cfg = _dit_cfg(steps=(3, 3), sample_every=4)
    uninterrupted = train_dit(_fresh_dit(), parts.vae, parts.text_encoder, _sources, cfg, tmp_path / "a",
                              progress=False)

    def interrupt(dit, step):  # a real SIGINT after step 4, mid-stage 2
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as info:
        train_dit(_fresh_dit(), parts.vae, parts.text_encoder, _sources, cfg, tmp_path / "b",
                  progress=False, sample_fn=interrupt)
    assert info.value.step == 4
    resumed = train_dit(_fresh_dit(), parts.vae, parts.text_encoder, _sources, cfg, tmp_path / "b",
                        progress=False)
    for (k, a), (_, b) in zip(uninterrupted.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    w = {"x": torch.arange(3.0)}
    save_checkpoint(tmp_path, 1, w, {"note": "first"})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(common.torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, 2, {"x": torch.zeros(3)}, {"note": "second"})
    monkeypatch.undo()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-000001"
    weights, state, _ = load_checkpoint(ckpt)
    assert state["note"] == "first" and torch.equal(weights["x"], torch.arange(3.0))


def test_vlb_matches_gaussian_kl():
    schedule = NoiseSchedule()
    loss = DiffusionLoss(schedule, learn_sigma=True)
    x0, noise = torch.randn(3, 4, 1, 2, 2), torch.randn(3, 4, 1, 2, 2)
    t = torch.tensor([5, 400, 999])
    xt = schedule.add_noise(x0, noise, t)
    out = torch.cat([noise + 0.1 * torch.randn_like(noise), torch.rand_like(noise) * 2 - 1], dim=1)
    total, values = loss(out, x0, xt, noise, t)
    # independent computation with torch.distributions
    D = torch.distributions
    b, abar = schedule.betas.double(), schedule.alphas_cumprod.double()
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    kls = []
    for i, ti in enumerate(t.tolist()):
        post_var = b[ti] * (1 - abar_prev[ti]) / (1 - abar[ti])
        c0 = b[ti] * abar_prev[ti].sqrt() / (1 - abar[ti])
        ct = (1 - abar_prev[ti]) * (1 - b[ti]).sqrt() / (1 - abar[ti])
        eps = out[i, :4].double()
        x0p = (xt[i].double() - (1 - abar[ti]).sqrt() * eps) / abar[ti].sqrt()
        frac = (out[i, 4:].double() + 1) / 2
        logvar = frac * b[ti].log() + (1 - frac) * post_var.log()
        q = D.Normal(c0 * x0[i].double() + ct * xt[i].double(), post_var.sqrt())
        p = D.Normal(c0 * x0p + ct * xt[i].double(), (0.5 * logvar).exp())
        kls.append(D.kl_divergence(q, p))
    expected_vb = torch.stack(kls).mean() / math.log(2.0)
    assert abs(values["vb"] - float(expected_vb)) < 1e-4 * max(1.0, float(expected_vb))
    assert abs(values["mse"] - float((out[:, :4] - noise).pow(2).mean())) < 1e-6


def test_reconstruction_loss_weights_object_pixels():
    """An object of 4 pixels on a flat 8x8 frame: unweighted, every pixel counts once;
    with foreground_weight 9 the object's pixels count 10 times."""
    video = torch.full((1, 3, 1, 8, 8), -0.5)
    video[:, 0, :, 2:4, 2:4] = 0.8                        # 4 object pixels, red channel
    err = torch.zeros_like(video)
    err[:, 1, :, 2:4, 2:4] = 0.2                          # hue error on the object only
    err[:, 2, :, 6:, 6:] = 0.1                            # a background error elsewhere
    rec = video + err
    plain = (0.2 * 4 + 0.1 * 4) / (3 * 64)
    assert reconstruction_loss(rec, video) == pytest.approx(plain)
    l2 = (0.2 * 4 + 2 * 0.04 * 4 + 0.1 * 4 + 2 * 0.01 * 4) / (3 * 64)
    assert reconstruction_loss(rec, video, mse_weight=2.0) == pytest.approx(l2)
    weighted = (10 * 0.2 * 4 + 0.1 * 4) / (3 * (60 + 10 * 4))
    assert reconstruction_loss(rec, video, foreground_weight=9.0) == pytest.approx(weighted)
    with pytest.raises(ConfigError, match="foreground_weight"):
        VAETrainConfig(foreground_weight=-1.0)


def test_snr_weighted_loss_grades_x0_error_at_high_noise():
    """cap 1 is the plain epsilon MSE; with a cap, each sample's epsilon MSE is weighted
    by clamp(1/SNR_t, 1, cap) / mean_t(weight), i.e. by its implied x0 error where the
    signal is below the noise."""
    schedule = NoiseSchedule()
    x0, noise = torch.randn(4, 4, 1, 2, 2), torch.randn(4, 4, 1, 2, 2)
    t = torch.tensor([10, 300, 800, 999])
    xt = schedule.add_noise(x0, noise, t)
    eps = noise + 0.05 * torch.randn_like(noise)
    plain, values = DiffusionLoss(schedule, learn_sigma=False)(eps, x0, xt, noise, t)
    per = (eps - noise).pow(2).flatten(1).mean(1).double()
    assert abs(float(plain) - float(per.mean())) < 1e-7
    cap = 1000.0
    weighted, wvalues = DiffusionLoss(schedule, learn_sigma=False, snr_weight_cap=cap)(eps, x0, xt, noise, t)
    abar = schedule.alphas_cumprod.double()
    w = ((1 - abar) / abar).clamp(1, cap)
    expected = (per * w[t] / w.mean()).mean()
    assert abs(float(weighted) - float(expected)) < 1e-6 * float(expected)
    assert wvalues["mse"] == pytest.approx(values["mse"], rel=1e-6)  # the logged MSE stays plain
    # where 1/SNR < cap the weighted term is exactly the implied x0 error (up to the mean)
    x0_err = ((xt.double() - (1 - abar[t]).sqrt().view(-1, 1, 1, 1, 1) * eps.double())
              / abar[t].sqrt().view(-1, 1, 1, 1, 1) - x0.double()).pow(2).flatten(1).mean(1)
    assert float(x0_err[2]) == pytest.approx(float(per[2] * w[800]), rel=1e-4)
    with pytest.raises(ConfigError):
        DiffusionLoss(schedule, learn_sigma=False, snr_weight_cap=0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parts = random_model(TINY, seed=0)
    env = DistEnv(rank, world, rank, torch.device("cpu"))
    cfg = _dit_cfg(steps=(2, 1), caption_dropout=0.0)
    dit = train_dit(_fresh_dit(), parts.vae, parts.text_encoder, _sources, cfg, f"{run_dir}/r{rank}",
                    env=env, progress=False)
    torch.save(dit.state_dict(), f"{run_dir}/weights-{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_processes_match_the_combined_batch(parts, tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
        assert p.exitcode == 0
    results = {r: torch.load(tmp_path / f"weights-{r}.pt") for r in range(2)}
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=0, atol=0, msg=k)
    # one process, the combined batch (2 x 2): the same gradients, so the same weights
    base = _dit_cfg(steps=(2, 1), caption_dropout=0.0)
    stages = tuple(type(s)(**{**s.__dict__, "batch_size": s.batch_size * 2}) for s in base.stages)
    single = train_dit(_fresh_dit(), parts.vae, parts.text_encoder, _sources,
                       DiTTrainConfig(**{**base.__dict__, "stages": stages}), tmp_path / "single",
                       progress=False)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(results[0][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_stage_lr_warms_up_holds_and_decays():
    from easyanimate_rt.train.dit_trainer import stage_lr_factor

    st = DiTStage("s", 100, 8, 8, decay_fraction=0.2)
    f = [stage_lr_factor(st, i, warmup_steps=10) for i in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0 and f[79] == 1.0
    assert f[80] == 1.0 and f[90] == pytest.approx(0.5) and f[99] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(f[80:], f[81:]))
    flat = DiTStage("s", 100, 8, 8)
    assert [stage_lr_factor(flat, i, 10) for i in (0, 50, 99)] == [pytest.approx(0.1), 1.0, 1.0]
    with pytest.raises(ConfigError):
        DiTStage("s", 100, 8, 8, decay_fraction=1.5)


def test_shapes_recipe_runs_every_phase_and_writes_a_loadable_model(tmp_path):
    """The shipped model's recipe at one step per stage: tokenizer, frozen T5, the three
    VAE stages, the three DiT stages and a model directory that generates."""
    from easyanimate_rt.reference.pipeline import ReferencePipeline
    from easyanimate_rt.train.recipe import ShapesRecipe, train_shapes

    recipe = ShapesRecipe(scale=1e-6, cache_size=4, scale_clips=2)
    out = train_shapes(tmp_path / "model", tmp_path / "run", recipe, progress=False)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["kind"] == "easyanimate-rt training run"
    for stage in ("vae", "vae_decoder", "vae_object", "dit"):
        assert latest_checkpoint(tmp_path / "run" / stage) is not None, stage
    decoder_stage, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "run" / "vae_decoder"))
    object_stage, state, _ = load_checkpoint(latest_checkpoint(tmp_path / "run" / "vae_object"))
    assert state["config"]["foreground_weight"] == recipe.vae_foreground_weight
    # Stage 3 trains the whole VAE again, although stage 2 froze the encoder of the same module.
    key = "encoder.conv_in.weight"
    assert not torch.equal(decoder_stage[key], object_stage[key])
    video = ReferencePipeline.from_pretrained(out).generate("a red circle moving left", steps=2,
                                                            frames=1, seed=0).frames
    assert video.shape == (1, recipe.size, recipe.size, 3)
    # Rerun into its own folders: every phase resumes at its last step (no new metrics
    # row, the marker kept) and the model directory, ours, is replaced.
    before = {p: p.read_bytes() for p in (tmp_path / "run").glob("**/*") if p.name in ("run.json", "metrics.csv")}
    assert train_shapes(tmp_path / "model", tmp_path / "run", recipe, progress=False) == out
    assert {p: p.read_bytes() for p in before} == before and len(before) == 5
    assert (out / "easyanimate_rt.json").is_file() and not (tmp_path / ".model.old").exists()
