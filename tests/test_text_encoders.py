import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from kandinsky5.encoders.prompt_templates import TEMPLATES, template_for
from kandinsky5.encoders.text_encoders import ClipEncoder, PromptEncoder, QwenEncoder, TextEncoderError
from kandinsky5.model.tasks import TINY_CLIP_DIM, TINY_TEXT_DIM

PROMPTS = ["A cat walks on the grass.", "Two people dance in a neon-lit street while rain falls, slow motion."]


@pytest.fixture(scope="module")
def qwen(tiny_tree):
    return QwenEncoder(tiny_tree / "text_encoder", dtype=torch.float32, expected_dim=TINY_TEXT_DIM)


@pytest.fixture(scope="module")
def clip(tiny_tree):
    return ClipEncoder(tiny_tree / "text_encoder2", expected_dim=TINY_CLIP_DIM)


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["video", "image2video", "image"])
def test_crop_removes_exactly_the_template_prefix(qwen, name):
    template = TEMPLATES[name]
    crop = qwen.crop_length(template)
    assert crop == len(ids(qwen.tokenizer, template.prefix))
    for prompt in PROMPTS:
        full = ids(qwen.tokenizer, template.format(prompt))
        prompt_ids = ids(qwen.tokenizer, prompt)
        assert full[crop : crop + len(prompt_ids)] == prompt_ids  # the first kept token is the prompt's first
        assert full[crop + len(prompt_ids) :] == ids(qwen.tokenizer, "<|im_end|>")


def test_image_edit_crop_follows_the_official_extra_three_tokens(qwen):
    template = TEMPLATES["image_edit"]
    crop = qwen.crop_length(template)
    assert crop == len(ids(qwen.tokenizer, template.prefix)) + 3
    prompt_ids = ids(qwen.tokenizer, PROMPTS[1])
    assert ids(qwen.tokenizer, template.format(PROMPTS[1]))[crop] == prompt_ids[3]


def test_encoded_embeddings_are_the_hidden_states_of_the_prompt_tokens(qwen):
    template = TEMPLATES["video"]
    embeddings, mask = qwen.encode(PROMPTS[:1], template, 256)
    full = torch.tensor([ids(qwen.tokenizer, template.format(PROMPTS[0]))])
    with torch.no_grad():
        hidden = qwen.model.model(input_ids=full).last_hidden_state
    crop = qwen.crop_length(template)
    assert torch.allclose(embeddings[0], hidden[0, crop:], atol=1e-6)
    assert mask.all() and mask.shape[1] == len(ids(qwen.tokenizer, PROMPTS[0])) + 1  # prompt + <|im_end|>


def test_batch_masks_lengths_and_padding(qwen):
    template = TEMPLATES["image"]
    embeddings, mask = qwen.encode(PROMPTS, template, 512)
    lengths = [len(ids(qwen.tokenizer, p)) + 1 for p in PROMPTS]
    assert mask.sum(dim=1).tolist() == lengths and embeddings.shape[:2] == (2, max(lengths))
    assert mask[0, : lengths[0]].all() and not mask[0, lengths[0] :].any()
    assert (embeddings[0, lengths[0] :] == 0).all()
    alone, _ = qwen.encode(PROMPTS[:1], template, 512)
    assert torch.allclose(embeddings[0, : lengths[0]], alone[0], atol=1e-5)


def test_long_prompts_are_cut_at_the_task_length(qwen):
    embeddings, mask = qwen.encode(["word " * 400], TEMPLATES["video"], 256)
    assert embeddings.shape[1] == 256 and mask.all()


def test_image_edit_with_a_source_image_appends_its_vision_tokens(qwen):
    image = Image.new("RGB", (64, 48), (200, 30, 30))
    with_image, mask = qwen.encode(["Make the sky purple"], TEMPLATES["image_edit"], 512, images=[image])
    without, _ = qwen.encode(["Make the sky purple"], TEMPLATES["image_edit"], 512)
    assert with_image.shape[1] > without.shape[1] and with_image.isfinite().all() and mask.all()


def test_template_choice_follows_the_official_pipelines():
    assert template_for("t2v", 121).name == "video" and template_for("i2v", 121).name == "video"
    assert template_for("t2v", 1).name == "image" and template_for("t2i", 1).name == "image"
    assert template_for("i2i", 1).name == "image_edit"
    assert template_for("i2i", 1, with_image=False).name == "image"  # I2I without a source: as official


def test_prompt_encoder_combines_both(qwen, clip):
    encoded = PromptEncoder(qwen, clip).encode(PROMPTS, TEMPLATES["video"], 256)
    assert encoded.pooled.shape == (2, TINY_CLIP_DIM) and encoded.pooled.dtype == torch.float32
    assert encoded.template == "video" and encoded.lengths == encoded.mask.sum(1).tolist()


def test_clip_single_file_and_hugging_face_folder_give_the_same_pooled_output(tiny_tree, clip, tmp_path):
    pooled = clip.encode(PROMPTS)
    assert pooled.shape == (2, TINY_CLIP_DIM)
    from_file = ClipEncoder(tiny_tree / "text_encoder2" / "clip_l.safetensors").encode(PROMPTS)
    clip.model.save_pretrained(tmp_path / "clip")
    clip.tokenizer.save_pretrained(tmp_path / "clip")
    from_folder = ClipEncoder(tmp_path / "clip").encode(PROMPTS)
    assert torch.equal(pooled, from_file) and torch.allclose(pooled, from_folder, atol=1e-6)
    assert not torch.allclose(pooled[0], pooled[1])


def test_qwen_hidden_size_mismatch_names_the_right_model(tiny_tree):
    with pytest.raises(TextEncoderError, match=r"hidden size 32, but the DiT expects 3584.*Qwen2.5-VL-7B-Instruct"):
        QwenEncoder(tiny_tree / "text_encoder", expected_dim=3584)


def test_qwen_folder_without_tokenizer_is_refused(tiny_tree, tmp_path):
    folder = tmp_path / "qwen"
    shutil.copytree(tiny_tree / "text_encoder", folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(TextEncoderError, match="has no tokenizer"):
        QwenEncoder(folder)


def test_hub_ids_are_refused_offline_and_missing_folders_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = "Qwen/Qwen2.5-VL-7B-Instruct does not exist \\(if it is a Hugging Face hub id: this toolkit never downloads"
    with pytest.raises(TextEncoderError, match=hub):
        QwenEncoder("Qwen/Qwen2.5-VL-7B-Instruct")
    with pytest.raises(TextEncoderError, match="hub id"):
        ClipEncoder("openai/clip-vit-large-patch14")
    (tmp_path / "weights").mkdir()  # a folder of the user's without the encoder in it: a path, not a hub id
    with pytest.raises(TextEncoderError, match="weights/text_encoder does not exist\\. ") as error:
        QwenEncoder("weights/text_encoder")
    assert "hub id" not in str(error.value)


def qwen_tiktoken_file() -> Path | None:
    for candidate in (os.environ.get("KANDINSKY5_QWEN_TIKTOKEN"), ".venv/share/qwen.tiktoken"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    return None


def test_qwen_in_fp8_stays_close_to_bf16(tiny_tree):
    from modules.fp8 import FP8Linear

    bf16 = QwenEncoder(tiny_tree / "text_encoder", dtype=torch.bfloat16)
    fp8 = QwenEncoder(tiny_tree / "text_encoder", fp8=True)
    quantized = [m for m in fp8.model.modules() if isinstance(m, FP8Linear)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    a, _ = bf16.encode(PROMPTS, TEMPLATES["video"], 256)
    b, _ = fp8.encode(PROMPTS, TEMPLATES["video"], 256)
    assert ((a.float() - b.float()).norm() / a.float().norm()) < 0.1
