"""Prompt expansion as the official pipelines do it, and LoRA trigger words."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

from kandinsky5.encoders.prompt_expansion import (
    MAX_NEW_TOKENS,
    QWEN_GENERATION,
    chat_text,
    expand_prompt,
    expansion_image,
    instruction,
)
from kandinsky5.encoders.prompt_templates import TEMPLATES
from kandinsky5.encoders.text_encoders import QwenEncoder, lm_head_missing
from kandinsky5.inference.media import read_metadata
from kandinsky5.tiny import write_qwen, write_qwen_single_file

from .generation_helpers import generate
from .test_lora_inference import lora_weights, write_kohya

PROMPT = "A cat walks on the grass."
KINDS = ("t2v", "i2v", "t2i", "i2i")


@pytest.fixture(scope="module")
def lively_qwen(tmp_path_factory):
    """A tiny Qwen folder whose answers depend on the question: its language weights are drawn wider than
    the default, so different instructions give different token ids (a wrong message would show)."""
    folder = tmp_path_factory.mktemp("qwen") / "qwen"
    write_qwen(folder, 3, language={"initializer_range": 0.5}, dtype=torch.float32)
    return folder


@pytest.fixture
def picture():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))


def official_processor(folder, monkeypatch):
    """transformers' Qwen2.5-VL processor, which the official pipelines load with AutoProcessor, from the
    folder's tokenizer, image processor and chat template. Its class check looks for the video processor,
    which needs torchvision (not installed here, and no video is processed), so that check is skipped."""
    from transformers import Qwen2VLImageProcessorPil

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, value: None)
    template = (folder / "chat_template.json").read_text()
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder),
        tokenizer=AutoTokenizer.from_pretrained(folder),
        video_processor=None,
        chat_template=json.loads(template)["chat_template"],
    )


def official_answer(processor, model, kind, prompt, image, seed):
    """The official expand_prompt, step by step: its message (I2V: image then text; I2I: text then the
    image at a quarter of its sides; T2V, T2I: text), the processor's chat template and inputs,
    set_seed(seed), generate(max_new_tokens=256) with the model's settings, the prompt's tokens trimmed."""
    text = {"type": "text", "text": instruction(kind, prompt)}
    if kind == "i2v":
        content = [{"type": "image", "image": image}, text]
    elif kind == "i2i":
        image = image.resize((image.width // 4, image.height // 4))
        content = [text, {"type": "image", "image": image}]
    else:
        content, image = [text], None
    messages = [{"role": "user", "content": content}]
    chat = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[chat], images=image, videos=None, padding=True, return_tensors="pt")
    transformers.set_seed(seed)
    generated = model.generate(**inputs, max_new_tokens=256)
    ids = generated[0, inputs["input_ids"].shape[1] :].tolist()
    decoded = processor.batch_decode([ids], skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    return chat, ids, decoded


def test_expansion_gives_the_official_token_ids_for_each_pipeline(lively_qwen, picture, monkeypatch):
    processor = official_processor(lively_qwen, monkeypatch)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(lively_qwen, dtype=torch.float32).eval()
    ours = QwenEncoder(lively_qwen, dtype=torch.float32)
    answers = set()
    for kind in KINDS:
        chat, ids, decoded = official_answer(processor, model, kind, PROMPT, picture, seed=7)
        shown = expansion_image(kind, picture)
        assert chat_text(kind, PROMPT, shown is not None) == chat, kind
        transformers.set_seed(7)
        assert ours.answer_ids(chat, shown, MAX_NEW_TOKENS) == ids, kind
        assert expand_prompt(ours, kind, PROMPT, picture, seed=7) == decoded, kind
        answers.add(tuple(ids))
    assert len(answers) == len(KINDS)  # each pipeline's message leads to its own answer


def test_the_image_edit_encoding_gives_image_tokens_their_positions_as_the_processor_does(
    lively_qwen, picture, monkeypatch
):
    """The official I2I encoding runs the processor's inputs through Qwen; transformers 5 places the image
    tokens in 2-D only when told which they are. Ours must give the same hidden states."""
    processor = official_processor(lively_qwen, monkeypatch)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(lively_qwen, dtype=torch.float32).eval()
    ours = QwenEncoder(lively_qwen, dtype=torch.float32)
    template = TEMPLATES["image_edit"]
    embeddings, mask = ours.encode(["Make the sky purple"], template, 512, images=[picture])
    text = template.format("Make the sky purple") + "<|vision_start|><|image_pad|><|vision_end|><|im_end|>"
    inputs = processor(text=[text], images=[picture], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True)["hidden_states"][-1][:, ours.crop_length(template) :]
    assert torch.allclose(embeddings, hidden[:, : embeddings.shape[1]], atol=1e-5)


def test_generation_expands_by_default_prints_and_records_the_expanded_prompt(tiny_tree, tmp_path, capsys):
    out = tmp_path / "cat.mp4"
    generate(tiny_tree, "tiny-t2v", "--prompt", PROMPT, "--steps", "1", "--frames", "5", "--output", str(out))
    meta = read_metadata(out)
    expected = expand_prompt(QwenEncoder(tiny_tree / "text_encoder"), "t2v", PROMPT, None, seed=42)
    assert meta["prompt"] == PROMPT and meta["expand_prompt"] is True and meta["expanded_prompt"] == expected
    assert f"expanded prompt 1: {expected}" in capsys.readouterr().out


def test_no_expand_prompt_and_a_prompt_line_switch(tiny_tree, tmp_path):
    generate(tiny_tree, "tiny-t2v", "--prompt", PROMPT, "--steps", "1", "--frames", "5", "--no_expand_prompt",
             "--output", str(tmp_path / "typed.mp4"))  # fmt: skip
    assert read_metadata(tmp_path / "typed.mp4")["expanded_prompt"] is None
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT} --expand off\n{PROMPT} --d 3\n")
    generate(tiny_tree, "tiny-t2v", "--from_file", str(prompts), "--steps", "1", "--frames", "5",
             "--output", str(tmp_path / "out"))  # fmt: skip
    assert read_metadata(tmp_path / "out" / "000_42.mp4")["expanded_prompt"] is None
    assert read_metadata(tmp_path / "out" / "001_3.mp4")["expanded_prompt"]


def test_i2v_and_i2i_show_qwen_the_image(tiny_tree, tmp_path, picture):
    picture.save(tmp_path / "first.png")
    qwen = QwenEncoder(tiny_tree / "text_encoder")
    for task, kind, output in (("tiny-i2v", "i2v", "clip.mp4"), ("tiny-i2i", "i2i", "edit.png")):
        generate(tiny_tree, task, "--prompt", PROMPT, "--image", str(tmp_path / "first.png"), "--steps", "1",
                 "--frames", "5" if kind == "i2v" else "1", "--output", str(tmp_path / output))  # fmt: skip
        expected = expand_prompt(qwen, kind, PROMPT, Image.open(tmp_path / "first.png"), seed=42)
        assert read_metadata(tmp_path / output)["expanded_prompt"] == expected


def test_lora_trigger_words_go_before_the_expanded_prompt(tiny_tree, tmp_path, capsys):
    lora = tmp_path / "styled.safetensors"
    write_kohya(lora, lora_weights())
    tensors = load_file(str(lora))
    save_file(tensors, str(lora), metadata={"ss_network_dim": "4", "trigger": "zxq style, "})
    common = ("--prompt", PROMPT, "--steps", "1", "--frames", "5", "--lora_weight", str(lora))
    generate(tiny_tree, "tiny-t2v", *common, "--output", str(tmp_path / "a.mp4"))
    expanded = expand_prompt(QwenEncoder(tiny_tree / "text_encoder"), "t2v", PROMPT, None, seed=42)
    assert read_metadata(tmp_path / "a.mp4")["expanded_prompt"] == "zxq style, " + expanded
    generate(tiny_tree, "tiny-t2v", *common, "--lora_trigger", "mine ", "--output", str(tmp_path / "b.mp4"))
    assert read_metadata(tmp_path / "b.mp4")["expanded_prompt"] == "mine " + expanded
    capsys.readouterr()
    generate(tiny_tree, "tiny-t2v", *common, "--no_expand_prompt", "--output", str(tmp_path / "c.mp4"))
    assert "'zxq style, '" in capsys.readouterr().out and read_metadata(tmp_path / "c.mp4")["expanded_prompt"] is None


def qwen_without_lm_head(tiny_tree, folder):
    shutil.copytree(tiny_tree / "text_encoder", folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_a_qwen_without_its_language_head_is_named_with_the_way_out(tiny_tree, tmp_path, capsys):
    headless = qwen_without_lm_head(tiny_tree, tmp_path / "qwen")
    assert lm_head_missing(tiny_tree / "text_encoder") is None and "lm_head.weight" in lm_head_missing(headless)
    common = ("--prompt", PROMPT, "--steps", "1", "--frames", "5", "--text_encoder_qwen", str(headless))
    with pytest.raises(SystemExit) as stop:
        generate(tiny_tree, "tiny-t2v", *common, "--expand_prompt", "--output", str(tmp_path / "a.mp4"))
    message = str(stop.value.code)
    assert str(headless) in message and "lm_head.weight" in message and "--no_expand_prompt" in message
    assert not (tmp_path / "a.mp4").exists()
    capsys.readouterr()
    generate(tiny_tree, "tiny-t2v", *common, "--output", str(tmp_path / "b.mp4"))  # the default: a note
    out = capsys.readouterr().out
    assert "note: prompts are encoded as typed" in out and str(headless) in out
    assert read_metadata(tmp_path / "b.mp4")["expanded_prompt"] is None


@pytest.mark.parametrize("fp8", [False, True])
def test_single_file_qwen_expands_with_its_head_and_qwens_generation_settings(tmp_path, fp8):
    file = tmp_path / "qwen_2.5_vl_7b.safetensors"
    write_qwen_single_file(file, 3, fp8_scaled=fp8, lm_head=True)
    assert lm_head_missing(file) is None
    qwen = QwenEncoder(file, dtype=torch.bfloat16)
    settings = qwen.model.generation_config
    assert (settings.repetition_penalty, settings.top_k, settings.eos_token_id) == (
        QWEN_GENERATION["repetition_penalty"],
        QWEN_GENERATION["top_k"],
        QWEN_GENERATION["eos_token_id"],
    )
    with safe_open(str(file), "pt") as f:
        head = f.get_tensor("lm_head.weight")
    assert torch.equal(qwen.model.lm_head.weight.cpu(), head)  # the file's head, not a fresh one
    first = expand_prompt(qwen, "t2v", PROMPT, None, seed=1)
    assert first and first == expand_prompt(qwen, "t2v", PROMPT, None, seed=1)
    headless = tmp_path / "headless.safetensors"
    write_qwen_single_file(headless, 3, fp8_scaled=fp8)
    assert "lm_head.weight" in lm_head_missing(headless)


def test_training_samples_expand_when_asked_with_the_trigger_word_first(tiny_tree, cached_dataset, tmp_path):
    import kandinsky5_train_network

    from .training_helpers import sampling_args, train_args

    _, _, video_only = cached_dataset
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT} --f 5 --s 1\n{PROMPT} --f 5 --s 1 --d 7 --expand off\n")
    out = tmp_path / "out"
    kandinsky5_train_network.main(
        train_args(tiny_tree, video_only, out, "--max_train_steps", "1", "--sample_at_first", "--sample_expand_prompt",
                   "--trigger_word", "zxq", *sampling_args(tiny_tree, prompts))
    )  # fmt: skip
    expected = "zxq " + expand_prompt(QwenEncoder(tiny_tree / "text_encoder"), "t2v", PROMPT, None, seed=42)
    assert read_metadata(out / "sample" / "step00000000" / "000_42.mp4")["expanded_prompt"] == expected
    assert read_metadata(out / "sample" / "step00000000" / "001_7.mp4")["expanded_prompt"] is None
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["trigger"] == "zxq "


def test_expansion_with_qwen_in_fp8(tiny_tree, tmp_path):
    generate(tiny_tree, "tiny-t2v", "--prompt", PROMPT, "--steps", "1", "--frames", "5", "--text_encoder_dtype", "fp8",
             "--output", str(tmp_path / "fp8.mp4"))  # fmt: skip
    expanded = read_metadata(tmp_path / "fp8.mp4")["expanded_prompt"]
    assert expanded and expanded != PROMPT
