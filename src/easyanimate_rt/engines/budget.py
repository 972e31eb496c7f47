"""Refuse requests that cannot fit before any work: DiT tokens against ``max_tokens``
and an estimate of the memory one generation holds at its peak against what the
machine has.

The estimate is deliberately simple and errs high on nothing that matters: weights
(float32 DiT and T5 parameters from the config), the activations of one DiT block for the
guidance batch (residual stream, q/k/v, the MLP's 4x hidden, and the attention score
matrix that ONNX Runtime CPU materialises: per-frame spatial attention F x S^2, global
attention (V3's hybrid blocks) (F S)^2, temporal attention S x F^2, all per head), and
one decoder slice. It is there to stop a 2048 x 2048 x 1440 typo from swapping the
machine for an hour, not to predict the allocator; a request within 2x of the limit
still runs. It applies to builds too (``build``, ``serve --buckets``, compile on first
use): a bucket that cannot run on this machine is refused before any export.
"""

from __future__ import annotations

import os

from ..errors import InputError
from ..reference.config import ModelConfig
from ..reference.request import GenerationRequest, dit_tokens, token_counts

FLOAT = 4


def parameter_count(config: ModelConfig) -> int:
    d = config.dit
    hidden = d.num_attention_heads * d.attention_head_dim
    per_block = 4 * hidden * hidden * 2 + 2 * d.mlp_ratio * hidden * hidden  # self + cross attention, MLP
    if d.motion_module:
        per_block += 4 * hidden * hidden
    t5 = config.text_encoder
    text = t5.num_layers * (4 * t5.d_model * t5.num_heads * t5.d_kv + 3 * t5.d_model * t5.d_ff)
    return d.num_layers * per_block + text  # DiT + T5; the VAE is small beside them


def shape_peak_bytes(config: ModelConfig, height: int, width: int, frames: int, batch: int) -> int:
    """Estimated peak of one generation at this size with DiT batch ``batch``."""
    d = config.dit
    latent, spatial, tokens = token_counts(config, height, width, frames)
    hidden = d.num_attention_heads * d.attention_head_dim
    stream = batch * tokens * hidden * (6 + 2 * d.mlp_ratio)
    scores = batch * d.num_attention_heads * latent * spatial * spatial
    if d.hybrid_global_attention:
        scores = max(scores, batch * d.num_attention_heads * tokens * tokens)
    if d.motion_module:
        heads = max(d.temporal_num_heads, d.temporal_num_heads_odd or 0)  # the odd blocks may have their own
        scores = max(scores, batch * heads * spatial * latent * latent)
    decode = 3 * 128 * 8 * height * width * 4  # one slice: 128 channels, ~8 frames, a few buffers
    return (parameter_count(config) + stream + scores + decode) * FLOAT


def peak_bytes(config: ModelConfig, req: GenerationRequest, prompts: int = 1) -> int:
    """Estimated peak of ``req``, with ``prompts`` such requests generated as one batch."""
    batch = (2 if req.guidance_mode == "batched" and req.guidance_scale != 1.0 else 1) * prompts
    return shape_peak_bytes(config, req.height, req.width, req.frames, batch)


def check_bucket_budget(config: ModelConfig, height: int, width: int, frames: int, prompts: int = 1,
                        guidance: str = "batched", memory_bytes: int | None = None) -> None:
    """An InputError naming the estimate when engines for this bucket (``prompts`` per
    batch, ``guidance`` batched: DiT batch 2 per prompt) could not run on this machine;
    raised before any export or build."""
    limit = memory_bytes if memory_bytes is not None else available_bytes()
    if limit is None:
        return
    need = shape_peak_bytes(config, height, width, frames, (2 if guidance == "batched" else 1) * prompts)
    if need > 2 * limit:
        _, _, tokens = token_counts(config, height, width, frames)
        name = f"{height}x{width}x{frames}" + (f"b{prompts}" if prompts > 1 else "")
        raise InputError(f"bucket {name} would need about {need / 2**30:,.1f} GiB at its peak ({tokens:,} DiT "
                         f"tokens), but {limit / 2**30:,.1f} GiB are available; no engines were exported or built "
                         f"for it: ask for fewer frames or a smaller size")


def available_bytes() -> int | None:
    """MemAvailable (Linux), else physical memory; None where neither is known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_budget(config: ModelConfig, req: GenerationRequest, max_tokens: int | None = None,
                 memory_bytes: int | None = None, prompts: int = 1) -> None:
    """An InputError naming the rule and the numbers when ``req`` (``prompts`` of them in
    one batch) cannot fit."""
    frames, spatial, tokens = dit_tokens(config, req)
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InputError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        if tokens > max_tokens:
            raise InputError(f"{req.height}x{req.width}x{req.frames} is {tokens:,} DiT tokens ({frames} latent "
                             f"frames x {spatial} per frame), over the limit of {max_tokens:,} (--max-tokens); "
                             f"ask for fewer frames or a smaller size")
    limit = memory_bytes if memory_bytes is not None else available_bytes()
    if limit is None:
        return
    need = peak_bytes(config, req, prompts)
    if need > 2 * limit:
        several = f" x {prompts} prompts in one batch" if prompts > 1 else ""
        raise InputError(f"{req.height}x{req.width}x{req.frames}{several} would need about {need / 2**30:,.1f} GiB "
                         f"at its peak ({tokens:,} DiT tokens), but {limit / 2**30:,.1f} GiB are available; ask for "
                         f"fewer frames or a smaller size, or --guidance-mode sequential"
                         + (", or a smaller batch_size" if prompts > 1 else ""))
