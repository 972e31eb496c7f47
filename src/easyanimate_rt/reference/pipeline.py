"""Reference text-to-video (and image-to-video) pipeline: the definition the runtime is
validated against.

1. encode the prompt and the negative prompt (T5);
2. draw initial latents from the seed; for an InP model, build the inpaint conditioning
   as upstream V3 does (mask and masked-video latents: every frame generated for
   text-to-video, frame 0 kept from the start image for image-to-video; the image's
   CLIP embedding for image-to-video);
3. denoise with classifier-free guidance (batched by default, or sequential);
4. decode slice by slice with the Slice VAE; return uint8 frames and fps.

Symbols: B guidance batch (2), C latent channels, F latent frames, H, W latent size,
S text tokens, E text width.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import InputError
from ..media import from_uint8, to_uint8
from .request import GUIDANCE_MODES, GenerationRequest, Video, default_request, dit_tokens  # noqa: F401
from .samplers import NoiseSchedule, make_sampler
from .schedule import SeededNoise, nonfinite_error
from .smooth import check_decode, iter_smoothed
from .weights import EasyAnimateModel, load_model_or_preset

log = logging.getLogger(__name__)

GenerationResult = Video  # the reference's result is the runtime's type (reference/request.py)


StepCallback = Callable[[int, int], None]


class ReferencePipeline:
    """Text -> video with the PyTorch reference networks."""

    def __init__(self, model: EasyAnimateModel, device: torch.device | str = "cpu", clip_encoder=None):
        self.model = model.to(device).eval()
        self.config = model.config
        self.device = torch.device(device)
        self.clip_encoder = clip_encoder  # image (H, W, 3) uint8 -> (1, K); InP image-to-video
        if clip_encoder is not None:
            k = self.config.dit.clip_channels
            if not k:
                raise InputError(f"a CLIP image encoder was given, but {self.config.name!r} takes no CLIP input")
            if getattr(clip_encoder, "embed_dim", k) != k:
                raise InputError(f"the CLIP image encoder gives {clip_encoder.embed_dim}-d embeddings; the DiT "
                                 f"takes {k}-d")

    @classmethod
    def from_pretrained(cls, source: str | Path, device: torch.device | str = "cpu",
                        preset: str | None = None, clip_model: str | Path | None = None, loras=()
                        ) -> "ReferencePipeline":
        """``source``: a model directory, or a preset name for random weights;
        ``clip_model``: a local CLIP vision model directory (image-to-video); ``loras``:
        LoRA adapters merged into the model (lora.adapters_of: paths,
        ``PATH:WEIGHT`` or (path, weight)), checked before the model loads."""
        from .lora import adapters_of, merge_logged

        adapters = adapters_of(loras)
        clip = None
        if clip_model is not None:
            from .clip import ClipImageEncoder

            clip = ClipImageEncoder.from_pretrained(clip_model, device)
        model = load_model_or_preset(source, preset=preset)
        if adapters:
            merge_logged(model, adapters)
        return cls(model, device, clip)

    def request(self, prompt: str, **kwargs) -> GenerationRequest:
        """A request filled with this model's sampling defaults."""
        return default_request(self.config, prompt, **kwargs)

    # 1. text
    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        emb, mask = self.model.text_encoder.encode([negative_prompt, prompt], device=self.device)
        return emb.to(self.model.dit.proj_out.weight.dtype), mask  # (2, S, E), (2, S)

    # 2. InP conditioning
    @torch.no_grad()
    def inpaint_latents(self, req: GenerationRequest) -> torch.Tensor | None:
        """(1, 2C, F', h, w) mask latents + masked-video latents, or None for a text-to-video
        model. As upstream V3 builds them (``get_image_to_video_latent`` and the inpaint
        pipeline's ``prepare_mask_latents``): a mask that is 1 where frames are generated
        and 0 where they are kept, tiled to 3 channels; a masked video that is the input
        where kept and -1 elsewhere; both through the VAE encoder (posterior mean, scaled;
        upstream draws a sample). Text-to-video generates every frame (an all-ones mask and
        an all -1 video: upstream's predict scripts, whose pipeline cannot run without a
        video); image-to-video repeats the start image and keeps frame 0."""
        if not self.config.dit.inpaint:
            return None
        vae = self.model.vae
        dtype = next(vae.parameters()).dtype
        shape = (1, 3, req.frames, req.height, req.width)
        generate = torch.ones(1, 1, req.frames, 1, 1, device=self.device, dtype=dtype)   # 1 = to generate
        if req.image is None:
            video = torch.full(shape, -1.0, device=self.device, dtype=dtype)
        else:
            image = from_uint8(np.asarray(req.image)[None])[None].to(self.device, dtype)  # (1, 3, 1, H, W)
            video = image.expand(shape)                                     # (1, 3, F, H, W)
            generate[:, :, 0] = 0.0
        mask = generate.expand(shape)                                       # (1, 3, F, H, W)
        masked_video = torch.where(mask < 0.5, video, torch.full_like(video, -1.0))
        out = torch.cat([vae.encode(mask), vae.encode(masked_video)], dim=1)  # (1, 2C, F', h, w)
        return out.to(self.model.dit.proj_out.weight.dtype)

    @torch.no_grad()
    def clip_condition(self, req: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(embeds (2, K), mask (2, T)) for the [negative, positive] branches, or None for a
        model without CLIP input. The negative branch and text-to-video get zeros with a
        zero mask (the CLIP tokens are hidden); image-to-video with a CLIP encoder gives
        the positive branch the image's embedding. Without a CLIP encoder image-to-video
        runs on the mask and masked-video latents alone, as upstream does when no CLIP
        image is passed."""
        dit = self.config.dit
        if not dit.clip_channels:
            return None
        dtype = self.model.dit.proj_out.weight.dtype
        embeds = torch.zeros(2, dit.clip_channels, device=self.device, dtype=dtype)
        mask = torch.zeros(2, dit.clip_tokens, device=self.device, dtype=dtype)
        if req.image is not None:
            if self.clip_encoder is None:
                log.warning("image-to-video without a CLIP vision model: the DiT gets no CLIP image "
                            "embedding (as upstream without a clip_image); pass clip_model= to add it")
            else:
                embeds[1] = self.clip_encoder(np.asarray(req.image))[0].to(self.device, dtype)
                mask[1] = 1.0
        return embeds, mask

    # 3. denoising loop
    @torch.no_grad()
    def denoise(self, req: GenerationRequest, emb: torch.Tensor, mask: torch.Tensor,
                callback: StepCallback | None = None, trace: list | None = None) -> torch.Tensor:
        """The guided sampler loop; ``trace`` (a list) receives the latents after each step.
        Latents that turn NaN or infinite stop the loop with a NumericalError naming the
        step and the sampler."""
        dit = self.model.dit
        dtype = dit.proj_out.weight.dtype
        c = self.config.vae.latent_channels
        noise_of = SeededNoise(req.seed)
        schedule = NoiseSchedule(clip_sample=self.config.sampling.clip_sample,
                                 prediction_type=self.config.dit.prediction_type)
        sampler = make_sampler(req.sampler, req.steps, schedule, device=self.device)
        shape = req.latent_shape(self.config)
        x = (torch.from_numpy(noise_of(shape)) * sampler.init_noise_sigma).to(self.device)
        inpaint = self.inpaint_latents(req)
        clip = self.clip_condition(req)
        guided = req.guidance_scale != 1.0
        if not guided:
            emb, mask = emb[1:], mask[1:]

        def cond(branch: slice, i: int) -> dict[str, torch.Tensor]:
            """The InP inputs of the branches ``branch`` of [negative, positive] at step i."""
            extra: dict[str, torch.Tensor] = {}
            n = len(range(2)[branch])
            if inpaint is not None:
                extra["inpaint_latents"] = inpaint.expand(n, *inpaint.shape[1:])
            if clip is not None:
                embeds, clip_mask = clip[0][branch], clip[1][branch]
                # Upstream shows the CLIP embedding only in the last clip_apply_ratio of the model calls.
                if i < req.calls * (1 - req.clip_apply_ratio):
                    embeds, clip_mask = torch.zeros_like(embeds), torch.zeros_like(clip_mask)
                extra["clip_embeds"], extra["clip_mask"] = embeds, clip_mask
            return extra

        for i in range(sampler.calls):
            t = sampler.timesteps[i]
            xin = sampler.scale_model_input(x, i).to(dtype)
            # out: epsilon or v, as the DiT predicts (config.prediction_type).
            if guided and req.guidance_mode == "batched":
                out = dit(xin.expand(2, *xin.shape[1:]), t.expand(2), emb, mask,
                          **cond(slice(0, 2), i))[:, :c]                    # (2, C, F, H, W)
                out_u, out_c = out.float().chunk(2)
            elif guided:
                out_u = dit(xin, t.expand(1), emb[:1], mask[:1], **cond(slice(0, 1), i))[:, :c].float()
                out_c = dit(xin, t.expand(1), emb[1:], mask[1:], **cond(slice(1, 2), i))[:, :c].float()
            else:
                out_u = out_c = dit(xin, t.expand(1), emb, mask, **cond(slice(1, 2), i))[:, :c].float()
            # Guidance is affine, so guiding v and converting equals converting each branch.
            eps = sampler.epsilon(i, xin, out_u + req.guidance_scale * (out_c - out_u),
                                  dit.config.prediction_type)
            noise = None
            if sampler.needs_noise:
                noise = torch.from_numpy(noise_of(shape)).to(self.device)
            x = sampler.step(i, x, eps, noise)
            if not bool(torch.isfinite(x).all()):  # one sync a step: the yardstick, not the fast path
                raise nonfinite_error(i + 1, sampler.calls, req.sampler)
            if trace is not None:
                trace.append(x.detach().cpu().clone())
            if callback is not None:
                callback(i + 1, sampler.calls)
        return x

    # 4. decode
    @torch.no_grad()
    def iter_frames(self, latents: torch.Tensor, decode: str = "plain") -> Iterator[np.ndarray]:
        """Decoded uint8 frames (n, H, W, 3), one VAE slice at a time (constant memory);
        ``decode="smooth"``: upstream's smoothed decode (reference/smooth.py), streamed."""
        vae = self.model.vae
        plain = vae.iter_decode(latents.to(next(vae.parameters()).dtype))
        if check_decode(decode) == "smooth":
            frames = vae.config.video_frames(latents.shape[2])
            plain = iter_smoothed(plain, frames, vae.config, vae.encode_slice,
                                  lambda z, s: vae.decode_slice(z, s.start, s.length),
                                  lambda xs: torch.cat(list(xs), dim=2))
        for chunk in plain:
            yield to_uint8(chunk[0])

    def generate(self, prompt: str, callback: StepCallback | None = None, **kwargs) -> Video:
        req = self.request(prompt, **kwargs)
        return self.run(req, callback)

    def run(self, req: GenerationRequest, callback: StepCallback | None = None) -> Video:
        return self._run(req, callback, None)

    def generate_to(self, path: str | Path, req: GenerationRequest, callback: StepCallback | None = None,
                    max_tokens: int | None = None) -> Video:
        """Generate ``req`` and stream its frames into ``path`` slice by slice (the file
        appears complete or not at all): the runtime Pipeline's call, the same result."""
        from ..media import VideoWriter, check_output_path

        check_output_path(path)
        req.validate(self.config)
        tokens = dit_tokens(self.config, req)[2]
        if max_tokens is not None and tokens > max_tokens:
            raise InputError(f"{req.height}x{req.width}x{req.frames} is {tokens:,} DiT tokens, over the limit of "
                             f"{max_tokens:,} (--max-tokens)")
        with VideoWriter(path, self.config.sampling.fps) as writer:
            video = self._run(req, callback, writer.write)
        video.path = Path(path)
        return video

    def _run(self, req: GenerationRequest, callback: StepCallback | None, sink) -> Video:
        """Text, loop, decode; each decoded slice to ``sink`` (or kept, without one)."""
        import time

        req.validate(self.config)
        timings: dict = {}
        t = time.perf_counter()
        emb, mask = self.encode_prompt(req.prompt, req.negative_prompt)
        timings["text"], t = time.perf_counter() - t, time.perf_counter()
        latents = self.denoise(req, emb, mask, callback)
        timings["denoise"], t = time.perf_counter() - t, time.perf_counter()
        chunks = []
        for chunk in self.iter_frames(latents, req.decode):
            chunks.append(chunk) if sink is None else sink(chunk)
        timings["decode"] = time.perf_counter() - t
        frames = np.concatenate(chunks, axis=0) if chunks else None
        return Video(frames=frames, fps=self.config.sampling.fps, latents=latents, timings=timings)

    __call__ = generate
