import textwrap

import pytest
import torch
from needs import require

require("cv2")

from easyanimate_rt.data.caption import (  # noqa: E402
    CaptionConfig,
    caption_clips,
    limit_words,
    template_rewrite,
)
from easyanimate_rt.data.cli import main_data  # noqa: E402
from easyanimate_rt.data.manifest import read_manifest, write_manifest  # noqa: E402

WORDS = "a the video of in this shows red blue cat dog moving square text man walks street".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tokenizer(folder):
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    return BertTokenizer(str(folder / "vocab.txt"))


def _tiny_blip(folder):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tok = _tokenizer(folder / "vocab")
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok
                  ).save_pretrained(folder)
    vocab = len(SPECIAL) + len(WORDS)
    config = BlipConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, encoder_hidden_size=32,
                         bos_token_id=2, sep_token_id=3, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():  # random weights, but never emit special tokens: the caption is words
        model.text_decoder.cls.predictions.bias[: len(SPECIAL)] = -1e4
    model.save_pretrained(folder)


def _tiny_lm(folder):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                               bos_token_id=2, eos_token_id=3, pad_token_id=0)).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture()
def clips_manifest(synth, tmp_path):
    m = tmp_path / "filtered.jsonl"
    write_manifest(m, [{"path": str(synth[n]), "caption": "", "frames": 30 if n == "pan" else 10, "fps": 10,
                        "width": 96, "height": 64} for n in ("pan", "text")])
    return m


def test_template_rewrite():
    assert template_rewrite("A photo of a cat sitting on a mat") == "In this video, a cat sitting on a mat."
    assert template_rewrite("there is a man walking") == "In this video, a man walking."
    assert template_rewrite("NASA rocket launch.") == "In this video, NASA rocket launch."
    already = "In this video, a dog runs."
    assert template_rewrite(already) == already
    long = template_rewrite(" ".join(["word"] * 300))
    assert long.startswith("In this video") and len(long.split()) == 99
    assert limit_words("a b c", 2) == "a b."
    assert template_rewrite("   ") == ""


def test_caption_plumbing_with_tiny_blip(synth, clips_manifest, tmp_path):
    import imageio.v2 as iio
    from transformers import BlipForConditionalGeneration, BlipProcessor

    _tiny_blip(tmp_path / "blip")
    out = tmp_path / "manifest.jsonl"
    report = caption_clips(clips_manifest, out, CaptionConfig(model=str(tmp_path / "blip"), max_new_tokens=12))
    assert report.done == 2 and not report.failed
    records = read_manifest(out)
    # the raw caption equals a direct generate() on the middle frame
    model = BlipForConditionalGeneration.from_pretrained(tmp_path / "blip").eval()
    processor = BlipProcessor.from_pretrained(tmp_path / "blip")
    for r in records:
        frames = iio.mimread(r.path, memtest=False)
        with torch.no_grad():
            ids = model.generate(**processor(images=frames[len(frames) // 2], return_tensors="pt"),
                                 max_new_tokens=12, do_sample=False)
        expected = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
        assert expected and r.extra["raw_caption"] == expected
        assert r.caption == template_rewrite(expected) and r.caption.startswith("In this video, ")
        assert not r.missing


def test_caption_rewrite_with_tiny_lm(synth, clips_manifest, tmp_path):
    _tiny_blip(tmp_path / "blip")
    _tiny_lm(tmp_path / "lm")
    out = tmp_path / "manifest.jsonl"
    config = CaptionConfig(model=str(tmp_path / "blip"), rewrite_model=str(tmp_path / "lm"), max_new_tokens=8)
    assert caption_clips(clips_manifest, out, config).done == 2
    for r in read_manifest(out):
        assert r.caption.startswith("In this video") and len(r.caption.split()) < 100
        assert r.extra["raw_caption"]


def test_caption_missing_without_model(clips_manifest, tmp_path, capsys):
    out = tmp_path / "manifest.jsonl"
    argv = ["caption", str(tmp_path), "--input", str(clips_manifest), "--output", str(out), "--no-progress"]
    assert main_data(argv) == 0
    assert "no --model given" in capsys.readouterr().out
    records = read_manifest(out)
    assert len(records) == 2
    assert all(r.caption == "" and "caption" in r.missing for r in records)


def test_pluggable_captioner(clips_manifest, tmp_path, monkeypatch):
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "my_captioner.py").write_text(textwrap.dedent("""
        def make(model_path):
            def caption(image):
                assert image.ndim == 3 and image.shape[2] == 3
                return "A photo of a red square moving right"
            return caption
    """))
    monkeypatch.syspath_prepend(str(plugin))
    out = tmp_path / "manifest.jsonl"
    argv = ["caption", str(tmp_path), "--input", str(clips_manifest), "--output", str(out),
            "--captioner", "my_captioner:make", "--no-progress"]
    assert main_data(argv) == 0
    captions = {r.caption for r in read_manifest(out)}
    assert captions == {"In this video, a red square moving right."}


def test_bad_captioner_spec_is_an_input_error(clips_manifest, tmp_path):
    argv = ["caption", str(tmp_path), "--input", str(clips_manifest), "--output", str(tmp_path / "o.jsonl"),
            "--captioner", "no_such_module_xyz:make", "--no-progress"]
    assert main_data(argv) == 2
