"""Captions (paper section 5, DESIGN.md 3.3): a vision-language model describes the middle
frame, then the description is rewritten into one video caption ("In this video ...",
under 100 words).

Captioners are pluggable: anything callable as ``captioner(rgb_frame) -> str``.
``load_captioner("hf", path)`` builds the default, ``HFCaptioner``: any transformers
image-text-to-text model (BLIP, LLaVA, Qwen2-VL, ...) with its processor, loaded from
a local folder only. ``load_captioner("pkg.module:factory", path)`` calls
``factory(path)`` for a captioner of your own.

Rewriting: ``"template"`` (default) turns an image caption into the video form by rule
(drops "a photo of"-style openings, prefixes "In this video, ", cuts to 99 words).
``LMRewriter`` asks a local causal language model to do it, and still applies the
template rule to what it returns, so the stored caption always has the video form.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from easyanimate_rt.errors import CheckpointError, InputError, MissingDependencyError
from easyanimate_rt import media as vio
from easyanimate_rt.data.manifest import ClipRecord, rebase_path

logger = logging.getLogger(__name__)

Captioner = Callable[[np.ndarray], str]
MAX_WORDS = 99  # the paper's "< 100 words"
DEFAULT_PROMPT = "Describe this image in detail."
REWRITE_PROMPT = (
    "Rewrite this description of a video frame as one caption of the whole video. "
    "Start with 'In this video', use fewer than 100 words.\nDescription: {caption}\nCaption:"
)
VIDEO_PREFIX = "In this video"
_IMAGE_OPENINGS = re.compile(
    r"^\s*(?:(?:a|an|the)\s+)?(?:close-up\s+)?(?:photo|photograph|picture|image|still|frame|shot|screenshot)"
    r"\s+(?:of|showing|shows|with)\s+|^\s*(?:this|the)\s+(?:image|picture|photo|frame)\s+(?:shows|depicts|features)\s+"
    r"|^\s*there\s+(?:is|are)\s+",
    re.IGNORECASE,
)


def limit_words(text: str, max_words: int = MAX_WORDS) -> str:
    words = text.split()
    if len(words) <= max_words:
        return " ".join(words)
    return " ".join(words[:max_words]).rstrip(",;:") + "."


def template_rewrite(caption: str, max_words: int = MAX_WORDS) -> str:
    """An image caption -> "In this video, ..." (idempotent on text already in that form)."""
    text = " ".join(caption.split())
    if not text:
        return ""
    if not text.lower().startswith(VIDEO_PREFIX.lower()):
        text = _IMAGE_OPENINGS.sub("", text, count=1).strip() or text
        # Lower-case the first letter unless the first word looks like a name or acronym.
        first = text.split()[0]
        if not (len(first) > 1 and (first.isupper() or first[1:] != first[1:].lower())):
            text = text[0].lower() + text[1:]
        text = f"{VIDEO_PREFIX}, {text}"
    if text[-1] not in ".!?":
        text += "."
    return limit_words(text, max_words)


def _require_transformers(purpose: str):
    try:
        import transformers
    except ImportError as e:
        raise MissingDependencyError("transformers", extra="data", purpose=purpose) from e
    return transformers


def _local_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{what} folder {path} has no config.json (only local model folders are used)")
    return path


def _new_tokens(out, input_ids) -> Any:
    """Generated ids without the prompt, for models that echo it (decoder-only ones)."""
    if input_ids is None:
        return out
    n = input_ids.shape[1]
    if out.shape[1] > n and bool((out[:, :n] == input_ids).all()):
        return out[:, n:]
    return out


class HFCaptioner:
    """A transformers image-text-to-text model and processor from a local folder."""

    def __init__(self, model_path: str | Path, prompt: str | None = DEFAULT_PROMPT,
                 max_new_tokens: int = 60, device: str = "cpu"):
        import torch

        tf = _require_transformers("captioning")
        path = _local_dir(model_path, "captioner")
        self.device = torch.device(device)
        self.processor = tf.AutoProcessor.from_pretrained(str(path))
        self.model = tf.AutoModelForImageTextToText.from_pretrained(str(path)).eval().to(self.device)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens

    def _inputs(self, image: np.ndarray) -> dict:
        from PIL import Image

        pil = Image.fromarray(image)
        if getattr(self.processor, "chat_template", None) and self.prompt:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return self.processor(images=pil, text=text, return_tensors="pt")
        # Models without a chat template (BLIP) caption from the image alone.
        return self.processor(images=pil, return_tensors="pt")

    def __call__(self, image: np.ndarray) -> str:
        import torch

        inputs = {k: v.to(self.device) for k, v in self._inputs(image).items()}
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        ids = _new_tokens(out, inputs.get("input_ids"))
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0].strip()


class LMRewriter:
    """Rewrites a frame caption into a video caption with a local causal language model."""

    def __init__(self, model_path: str | Path, prompt: str = REWRITE_PROMPT, max_new_tokens: int = 150,
                 device: str = "cpu"):
        import torch

        tf = _require_transformers("caption rewriting")
        path = _local_dir(model_path, "rewrite model")
        self.device = torch.device(device)
        self.tokenizer = tf.AutoTokenizer.from_pretrained(str(path))
        self.model = tf.AutoModelForCausalLM.from_pretrained(str(path)).eval().to(self.device)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens

    def __call__(self, caption: str) -> str:
        import torch

        text = self.prompt.format(caption=caption)
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                      add_generation_prompt=True, tokenize=False)
        inputs = self.tokenizer(text, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        ids = _new_tokens(out, inputs["input_ids"])
        rewritten = self.tokenizer.decode(ids[0], skip_special_tokens=True).strip()
        # Keep the first paragraph; a small model may ramble on.
        rewritten = rewritten.split("\n\n")[0].strip()
        return template_rewrite(rewritten or caption)


def _factory(spec: str) -> Callable:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"captioner must be 'hf' or 'package.module:factory', got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise InputError(f"cannot import captioner factory {spec!r}: {e}") from e


def load_captioner(spec: str, model_path: str | Path | None, device: str = "cpu",
                   prompt: str | None = DEFAULT_PROMPT, max_new_tokens: int = 60) -> Captioner:
    """``"hf"`` -> HFCaptioner(model_path); ``"pkg.module:factory"`` -> factory(model_path)."""
    if spec == "hf":
        if model_path is None:
            raise InputError("the hf captioner needs a local model folder")
        return HFCaptioner(model_path, prompt=prompt, max_new_tokens=max_new_tokens, device=device)
    captioner = _factory(spec)(model_path)
    if not callable(captioner):
        raise InputError(f"captioner factory {spec!r} returned {type(captioner).__name__}, not a callable")
    return captioner


@dataclass(frozen=True)
class CaptionConfig:
    model: str | None = None  # local captioner folder; None records the caption as missing
    captioner: str = "hf"
    prompt: str | None = DEFAULT_PROMPT
    rewrite: str = "template"  # "template" or "none"
    rewrite_model: str | None = None  # local causal LM; replaces the template rewrite
    device: str = "cpu"
    max_new_tokens: int = 60  # caption length limit; the rewrite model gets 2.5x this

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.rewrite not in ("template", "none"):
            raise InputError(f"rewrite must be 'template' or 'none', got {self.rewrite!r}")
        for name in ("model", "rewrite_model"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise InputError(f"{name} path {value} does not exist")

    @property
    def enabled(self) -> bool:
        return self.model is not None or self.captioner != "hf"


@dataclass
class CaptionTask:
    """One manifest record -> the same record with ``caption`` (and ``raw_caption``)."""

    in_root: Path
    out_root: Path
    config: CaptionConfig = field(default_factory=CaptionConfig)
    name: str = "caption"

    def __post_init__(self) -> None:
        self._captioner: Captioner | None = None
        self._rewriter: Callable[[str], str] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_captioner"] = state["_rewriter"] = None  # models are loaded per process
        return state

    def check(self) -> None:
        if self.config.captioner != "hf":
            _factory(self.config.captioner)  # fail here, not in every worker
        elif self.config.enabled or self.config.rewrite_model:
            _require_transformers("captioning")

    def setup(self, threads: int) -> None:
        if not self.config.enabled or self._captioner is not None:
            return
        import torch

        torch.set_num_threads(threads)
        cfg = self.config
        self._captioner = load_captioner(cfg.captioner, cfg.model, cfg.device, cfg.prompt, cfg.max_new_tokens)
        if cfg.rewrite_model:
            self._rewriter = LMRewriter(cfg.rewrite_model, max_new_tokens=int(2.5 * cfg.max_new_tokens),
                                        device=cfg.device)
        elif cfg.rewrite == "template":
            self._rewriter = template_rewrite

    def __call__(self, data: dict) -> list[dict]:
        record = ClipRecord.from_dict(data)
        out = record.to_dict()
        out["path"] = rebase_path(record.path, self.in_root, self.out_root)
        missing = dict(record.missing)
        if not self.config.enabled:
            if not record.caption:
                missing["caption"] = "no captioner model given (--model)"
            out["missing"] = missing
            return [out]
        assert self._captioner is not None, "setup() was not called"
        path = record.resolve(self.in_root)
        middle = record.frames // 2
        try:
            frame = vio.read_frames_at(path, [middle])[middle]
        except vio.VideoReadError:
            # The recorded frame count may be stale; take the middle of the frames there are.
            frames = list(vio.iter_frames(path))
            if not frames:
                raise
            frame = frames[len(frames) // 2]
        raw = self._captioner(frame)
        caption = self._rewriter(raw) if self._rewriter is not None else " ".join(raw.split())
        out.update(caption=caption, raw_caption=raw)
        missing.pop("caption", None)
        if not caption:
            missing["caption"] = "the captioner returned an empty caption"
        out["missing"] = missing
        if not missing:
            out.pop("missing")
        return [out]


def caption_clips(manifest: str | Path, output: str | Path, config: CaptionConfig = CaptionConfig(), *,
                  workers: int = 1, progress: bool = False):
    """Caption every clip of ``manifest`` into ``output`` (resumable; see ``parallel``)."""
    from easyanimate_rt.data.parallel import run_manifest_stage

    return run_manifest_stage(lambda src, dst: CaptionTask(src, dst, config), manifest, output,
                              workers=workers, progress=progress)
