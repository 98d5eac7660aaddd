"""Qwen2.5-VL from one file (ComfyUI's text_encoders/qwen_2.5_vl_7b[_fp8_scaled].safetensors) with the
tokenizer shipped in the package, against the same weights in a Hugging Face folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from kandinsky5.encoders.prompt_templates import TEMPLATES
from kandinsky5.encoders.qwen_single_file import IMAGE_PROCESSOR
from kandinsky5.encoders.qwen_vocab import QWEN_SPECIAL_TOKENS, packaged_qwen_tokenizer
from kandinsky5.encoders.text_encoders import QwenEncoder, TextEncoderError
from kandinsky5.tiny import qwen_published_state, tiny_real_vocab_qwen, write_qwen_single_file

from .test_text_encoders import qwen_tiktoken_file

PROMPTS = ["A cat walks on the grass.", "Two dogs play in the snow at dusk, wide shot, 35 mm film — ünïcödé"]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_shipped_tokenizer_gives_the_official_template_crops():
    tokenizer = packaged_qwen_tokenizer()
    assert len(tokenizer) == 151665
    assert [tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS] == list(range(151643, 151665))
    for template in TEMPLATES.values():
        assert len(ids(tokenizer, template.prefix)) + template.extra_crop == template.official_crop, template.name
    assert len(ids(tokenizer, "A cat walks on the grass.")) == 7


@pytest.mark.skipif(qwen_tiktoken_file() is None, reason="the Qwen vocabulary (.ci/setup.sh fetches it) is absent")
def test_the_shipped_tokenizer_is_the_dashscope_vocabulary():
    from kandinsky5.encoders.qwen_vocab import convert_tiktoken

    rebuilt = convert_tiktoken(qwen_tiktoken_file())
    shipped = packaged_qwen_tokenizer()
    for text in [*PROMPTS, *(t.text for t in TEMPLATES.values()), "数字 123456 and emoji 🐈 <|im_end|>"]:
        assert rebuilt.encode(text).ids == ids(shipped, text)


@pytest.fixture(scope="module")
def qwen_files(tmp_path_factory):
    """The same tiny weights three ways: a Hugging Face folder, ComfyUI's bf16 file and its fp8-scaled file."""
    from transformers import Qwen2VLImageProcessorPil

    root = tmp_path_factory.mktemp("qwen")
    write_qwen_single_file(root / "qwen_2.5_vl_7b.safetensors", seed=5)
    write_qwen_single_file(root / "qwen_2.5_vl_7b_fp8_scaled.safetensors", seed=5, fp8_scaled=True)
    model = tiny_real_vocab_qwen(5).to(torch.bfloat16)
    folder = root / "hf"
    folder.mkdir()
    model.config.save_pretrained(folder)
    save_file(qwen_published_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = packaged_qwen_tokenizer()
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR).save_pretrained(folder)
    return root


def encodings(encoder: QwenEncoder, image: Image.Image):
    text = encoder.encode(PROMPTS, TEMPLATES["video"], 256)
    edit = encoder.encode(PROMPTS[:1], TEMPLATES["image_edit"], 512, images=[image])
    return text, edit


def test_the_single_file_encodes_as_the_folder_does(qwen_files):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    folder = encodings(QwenEncoder(qwen_files / "hf", dtype=torch.float32), image)
    single = encodings(QwenEncoder(qwen_files / "qwen_2.5_vl_7b.safetensors", dtype=torch.float32), image)
    for (a, mask_a), (b, mask_b) in zip(folder, single, strict=True):
        assert torch.equal(mask_a, mask_b) and torch.equal(a, b)


def test_the_fp8_scaled_file_is_dequantized_within_fp8_rounding(qwen_files):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (56, 56, 3), dtype=np.uint8))
    reference = encodings(QwenEncoder(qwen_files / "qwen_2.5_vl_7b.safetensors", dtype=torch.float32), image)
    scaled = QwenEncoder(qwen_files / "qwen_2.5_vl_7b_fp8_scaled.safetensors", dtype=torch.float32)
    kept_fp8 = QwenEncoder(qwen_files / "qwen_2.5_vl_7b_fp8_scaled.safetensors", fp8=True)
    for encoder in (scaled, kept_fp8):
        for (a, mask_a), (b, mask_b) in zip(reference, encodings(encoder, image), strict=True):
            assert torch.equal(mask_a, mask_b)
            error = float((a.float() - b.float()).norm() / a.float().norm())
            assert error < 0.1, error


def test_a_file_that_is_not_qwen_names_what_was_expected(tmp_path):
    other = tmp_path / "clip_l.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}, str(other))
    with pytest.raises(TextEncoderError, match="expected keys such as model.embed_tokens.weight"):
        QwenEncoder(other)
    small = tmp_path / "qwen_2.5_vl_3b.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(151936, 8)}, str(small))
    with pytest.raises(TextEncoderError, match="Qwen2.5-VL-7B-Instruct's is \\[152064, 3584\\]"):
        QwenEncoder(small)
