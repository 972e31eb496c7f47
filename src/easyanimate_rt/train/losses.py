"""Losses of the VAE (L1 + KL, hinge GAN, LPIPS) and the DiT (epsilon MSE + IDDPM VLB).

Symbols: B batch, C channels, F frames, H, W size; T training timesteps.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F_
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..reference.config import PREDICTION_TYPES
from ..reference.samplers import NoiseSchedule

# --- VAE --------------------------------------------------------------------------------

#: Foreground threshold of ``reconstruction_loss`` on [-1, 1] pixels (5% of the range).
FOREGROUND_THRESHOLD = 0.1


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), summed over latent elements, mean over batch."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def reconstruction_loss(rec: torch.Tensor, video: torch.Tensor, mse_weight: float = 0.0,
                        foreground_weight: float = 0.0, threshold: float = FOREGROUND_THRESHOLD
                        ) -> torch.Tensor:
    """Per-pixel L1 (+ ``mse_weight`` x L2) of videos (B, 3, F, H, W), as a weighted mean.

    With ``foreground_weight`` > 0 a pixel of ``video`` that differs from its frame's
    per-channel median (the background, where objects are small) by more than
    ``threshold`` in some channel weighs ``1 + foreground_weight``. On flat backgrounds
    a small object is a few percent of the pixels: unweighted, its hue errors barely
    move the loss, and the VAE encodes neighbouring hues alike (orange and yellow).
    """
    err = (rec - video).abs()
    if mse_weight:
        err = err + mse_weight * err.square()
    if not foreground_weight:
        return err.mean()
    background = video.flatten(3).median(dim=3).values[..., None, None]        # (B, 3, F, 1, 1)
    foreground = (video - background).abs().amax(dim=1, keepdim=True) > threshold  # (B, 1, F, H, W)
    weight = 1.0 + foreground_weight * foreground.to(err.dtype)
    return (weight * err).sum() / (weight.sum() * err.shape[1])


class FramePatchGAN(nn.Module):
    """2-D PatchGAN over single frames (each frame of a clip is judged on its own)."""

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(layers - 1):
            mods += [nn.Conv2d(c, c * 2, 4, 2, 1), nn.GroupNorm(8, c * 2), nn.LeakyReLU(0.2)]
            c *= 2
        mods += [nn.Conv2d(c, 1, 3, 1, 1)]
        self.main = nn.Sequential(*mods)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = video.shape
        frames = video.transpose(1, 2).reshape(b * f, c, h, w)        # (B*F, 3, H, W)
        return self.main(frames)                                      # (B*F, 1, H', W')


class ClipDiscriminator3D(nn.Module):
    """3-D convolutional discriminator over whole clips (judges motion too)."""

    def __init__(self, channels: int = 32, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv3d(3, channels, (3, 4, 4), (1, 2, 2), (1, 1, 1)), nn.LeakyReLU(0.2)]
        c = channels
        for _ in range(layers - 1):
            mods += [nn.Conv3d(c, c * 2, (3, 4, 4), (1, 2, 2), (1, 1, 1)), nn.GroupNorm(8, c * 2),
                     nn.LeakyReLU(0.2)]
            c *= 2
        mods += [nn.Conv3d(c, 1, 3, 1, 1)]
        self.main = nn.Sequential(*mods)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.main(video)                                       # (B, 1, F, H', W')


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F_.relu(1.0 - real).mean() + F_.relu(1.0 + fake).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        weight: float) -> torch.Tensor:
    """Balance the GAN gradient against the reconstruction gradient at the decoder's last
    layer (taming-transformers' adaptive weight), scaled by ``weight``."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach() * weight


# VGG16 "features" layer layout: (in, out) per conv; "M" = max-pool.
_VGG16 = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
          (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512)]
_LPIPS_TAPS = (3, 8, 15, 22, 29)  # indices of the ReLU outputs LPIPS compares
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
    """LPIPS (VGG16 variant) with weights from a local file, never downloaded.

    The file (safetensors or a torch state dict) holds torchvision-style
    ``net.features.N.weight|bias`` for VGG16 and ``lins.K.weight`` (1x1 conv weights of
    shape (1, C, 1, 1)) for the five linear heads.
    """

    def __init__(self, weights_path: str | Path):
        super().__init__()
        layers: list[nn.Module] = []
        for spec in _VGG16:
            if spec == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(spec[0], spec[1], 3, 1, 1), nn.ReLU(inplace=False)]
        self.net = nn.Module()
        self.net.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList([nn.Conv2d(c, 1, 1, bias=False) for c in _LPIPS_CHANNELS])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        path = Path(weights_path)
        if not path.exists():
            raise CheckpointError(f"LPIPS weights not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        missing, _ = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in ("shift", "scale")]
        if missing:
            raise CheckpointError(f"LPIPS weights {path} lack {missing[:5]}")
        self.requires_grad_(False).eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.net.features):
            x = layer(x)
            if i in _LPIPS_TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            if i == _LPIPS_TAPS[-1]:
                break
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Mean LPIPS distance between frame batches (N, 3, H, W) in [-1, 1]."""
        fa = self._taps((a - self.shift) / self.scale)
        fb = self._taps((b - self.shift) / self.scale)
        return sum(lin((x - y).pow(2)).mean() for lin, x, y in zip(self.lins, fa, fb))


# --- DiT -------------------------------------------------------------------------------

def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).pow(2) * torch.exp(-logvar2))


class DiffusionLoss:
    """Epsilon MSE, plus the variational bound for learned-variance channels (IDDPM
    "hybrid" objective, as PixArt trains). The VLB sees the x0 implied by the stop-gradient
    prediction, so it only trains the variance, as in IDDPM.

    ``snr_weight_cap`` > 1 weights each sample's epsilon MSE by clamp(1 / SNR_t, 1, cap),
    normalised by the weights' mean over t: where the signal is below the noise the
    network is then graded on the error of its implied x0 = (x_t - sqrt(1 - abar) eps) /
    sqrt(abar) rather than of eps. The network still predicts epsilon. Why: with the
    linear schedule abar_999 = 4e-5, so an epsilon error of e becomes an x0 error of
    e / 0.0064; a small network trained on plain epsilon MSE stops at e ~ 0.03, which makes
    the first sampling steps inject a spurious "signal" of std ~5 that later steps
    faithfully denoise into off-distribution latents. 1 = the paper's plain epsilon MSE.

    ``prediction_type="v_prediction"`` trains v = sqrt(abar) eps - sqrt(1 - abar) x0
    instead (MSE on v; the logged "mse" is then the v MSE). v is well conditioned at
    every t: at t = 999 it is about -x0, so no precision beyond the data's is needed.
    """

    def __init__(self, schedule: NoiseSchedule, learn_sigma: bool, snr_weight_cap: float = 1.0,
                 prediction_type: str = "epsilon"):
        if not snr_weight_cap >= 1.0:
            raise ConfigError(f"snr_weight_cap must be >= 1, got {snr_weight_cap!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
        self.schedule = schedule
        self.learn_sigma = learn_sigma
        self.prediction_type = prediction_type
        b = schedule.betas.double()
        abar = schedule.alphas_cumprod.double()
        weight = ((1 - abar) / abar).clamp(1.0, snr_weight_cap)
        self.weight = (weight / weight.mean()).float()                 # (T,), mean 1
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = b * (1 - abar_prev) / (1 - abar)
        self.tables = {
            "sqrt_abar": abar.sqrt(), "sqrt_1m_abar": (1 - abar).sqrt(),
            "coef_x0": b * abar_prev.sqrt() / (1 - abar),
            "coef_xt": (1 - abar_prev) * (1 - b).sqrt() / (1 - abar),
            "post_logvar": torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            "log_beta": torch.log(b),
        }

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        v = self.tables[name].to(like.device)[t].float()
        return v.reshape(-1, *([1] * (like.dim() - 1)))

    def __call__(self, model_out: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor,
                 noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        c = x0.shape[1]
        pred = model_out[:, :c].float()
        a, s = self._at("sqrt_abar", t, x0), self._at("sqrt_1m_abar", t, x0)
        eps_pred = self.prediction_type == "epsilon"
        target = noise.float() if eps_pred else a * noise.float() - s * x0.float()
        per_sample = (pred - target).pow(2).flatten(1).mean(1)  # (B,)
        mse = per_sample.mean()
        loss = (per_sample * self.weight.to(per_sample.device)[t]).mean()
        if not self.learn_sigma:
            return loss, {"mse": mse.item()}
        x0_pred = (xt.float() - s * pred.detach()) / a if eps_pred else a * xt.float() - s * pred.detach()
        frac = (model_out[:, c:].float() + 1) / 2                       # variance interpolation
        min_log, max_log = self._at("post_logvar", t, x0), self._at("log_beta", t, x0)
        model_logvar = frac * max_log + (1 - frac) * min_log
        model_mean = self._at("coef_x0", t, x0) * x0_pred + self._at("coef_xt", t, x0) * xt.float()
        true_mean = self._at("coef_x0", t, x0) * x0.float() + self._at("coef_xt", t, x0) * xt.float()
        kl = _normal_kl(true_mean, min_log.expand_as(true_mean), model_mean, model_logvar)
        nll = 0.5 * (math.log(2 * math.pi) + model_logvar
                     + (x0.float() - model_mean).pow(2) * torch.exp(-model_logvar))
        first = (t == 0).reshape(-1, *([1] * (x0.dim() - 1)))
        vb = torch.where(first, nll, kl).mean() / math.log(2.0)
        # IDDPM weights the bound by T/1000 so its scale does not depend on T.
        vb = vb * self.schedule.num_train_timesteps / 1000.0
        return loss + vb, {"mse": mse.item(), "vb": vb.item()}
