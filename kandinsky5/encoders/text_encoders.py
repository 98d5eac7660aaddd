"""Prompt encoding: Qwen2.5-VL (per-token embeddings) and CLIP-L (one pooled vector per prompt).

Qwen2.5-VL-7B-Instruct reads the prompt inside the official template; the template's prefix is
cropped off its last hidden state, leaving the prompt's tokens (plus the closing ``<|im_end|>``),
at most the task's length (256 video, 512 image). Prompts of a batch are right-padded; the mask
says which positions are real. CLIP ViT-L/14's text tower reads the bare prompt (77 tokens) and
gives its pooled output in fp32. Nothing is ever downloaded: both load from local folders/files.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, GenerationConfig

from kandinsky5.encoders.clip_vocab import CLIP_MAX_LENGTH, packaged_clip_tokenizer
from kandinsky5.encoders.prompt_expansion import QWEN_GENERATION
from kandinsky5.encoders.prompt_templates import PromptTemplate, edit_prompt_text
from kandinsky5.encoders.qwen_single_file import (
    IMAGE_PROCESSOR,
    QwenFileError,
    hidden_size,
    is_qwen_file,
    read_qwen_file,
)
from kandinsky5.encoders.qwen_vocab import packaged_qwen_tokenizer
from kandinsky5.model.dtypes import TEXT_ENCODER_DTYPES
from modules.fp8 import quantize_linears
from modules.safetensors_read import SafetensorsFile

IMAGE_PAD = "<|image_pad|>"

QWEN_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
CLIP_MODEL = "openai/clip-vit-large-patch14"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
CLIP_KEY_PREFIXES = ("cond_stage_model.transformer.", "clip_l.transformer.", "transformer.", "clip_l.")
CLIP_UNUSED_KEYS = ("text_projection.weight", "logit_scale", "embeddings.position_ids")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings (its load report, in terminal escape codes) silenced while a model loads."""
    from transformers.utils import logging as transformers_logging

    level = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(level)


class TextEncoderError(ValueError):
    pass


@dataclass
class EncodedPrompts:
    """Encoder outputs for a batch of prompts."""

    embeddings: torch.Tensor  # (B, L, qwen_dim), right-padded, zeros in the padding
    mask: torch.Tensor  # (B, L) bool, True at real tokens
    pooled: torch.Tensor  # (B, clip_dim) fp32
    template: str

    @property
    def lengths(self) -> list[int]:
        return self.mask.sum(dim=1).tolist()


def local_path(path: str | Path, what: str, download_hint: str) -> Path:
    """``path`` as an existing local path; a missing one (perhaps a hub id) is a clear error."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    why = f"{path} does not exist"
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)) and not candidate.parent.exists():
        why += " (if it is a Hugging Face hub id: this toolkit never downloads anything)"
    raise TextEncoderError(f"{what}: {why}. {download_hint}")


def _qwen_hidden_size(config: dict) -> int:
    text = config.get("text_config") or {}
    return int(text.get("hidden_size") or config["hidden_size"])


class QwenEncoder:
    """Qwen2.5-VL from a local folder (config, weights, tokenizer; a processor config for images), or
    from one weights file (ComfyUI's ``qwen_2.5_vl_7b[_fp8_scaled].safetensors``; see qwen_single_file).

    ``fp8`` stores the language model's Linear weights as block-scaled float8 (about 8 GB instead
    of 15 GB for the 7B model); they are quantized on the CPU before the model moves to ``device``."""

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        expected_dim: int | None = None,
        fp8: bool = False,
    ):
        from transformers import Qwen2_5_VLForConditionalGeneration

        hint = (
            f"Download {QWEN_MODEL} to a folder (for example weights/text_encoder) and pass that folder, or pass "
            "ComfyUI's qwen_2.5_vl_7b.safetensors file"
        )
        folder = local_path(path, "Qwen2.5-VL text encoder", hint)
        self.device, self._processor = torch.device(device), None
        if is_qwen_file(folder):
            self._load_single_file(folder, dtype, expected_dim, fp8)
            return
        config_file = folder / "config.json"
        if not folder.is_dir() or not config_file.exists():
            raise TextEncoderError(
                f"Qwen2.5-VL text encoder: {folder} should be a model folder with config.json. {hint}"
            )
        hidden = _qwen_hidden_size(json.loads(config_file.read_text()))
        if expected_dim is not None and hidden != expected_dim:
            raise TextEncoderError(
                f"the Qwen model in {folder} has hidden size {hidden}, but the DiT expects {expected_dim}. "
                f"Kandinsky 5 uses {QWEN_MODEL} (hidden size 3584); Qwen2.5-VL-3B has 2048 and does not work."
            )
        if not any((folder / name).exists() for name in TOKENIZER_FILES):
            raise TextEncoderError(
                f"Qwen2.5-VL text encoder: {folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                f"copy the tokenizer files of {QWEN_MODEL} into it."
            )
        if not list(folder.glob("*.safetensors")):
            raise TextEncoderError(
                f"Qwen2.5-VL text encoder: {folder} holds no weights (model.safetensors, or model-*.safetensors "
                f"with model.safetensors.index.json). {hint}"
            )
        self.folder, self.single_file = folder, None
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.tokenizer.padding_side = "right"
        try:
            with quiet_transformers():  # its load report flags the unused lm_head of a folder without it
                self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                    folder, dtype=dtype, local_files_only=True
                )
        except (OSError, SafetensorError) as error:  # a truncated or damaged weights file
            raise TextEncoderError(
                f"Qwen2.5-VL text encoder: the weights in {folder} cannot be read ({error})"
            ) from None
        self._finish(fp8, hidden)

    def _load_single_file(self, file: Path, dtype: torch.dtype, expected_dim: int | None, fp8: bool) -> None:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        try:
            config, state = read_qwen_file(file, dtype)
        except QwenFileError as error:
            raise TextEncoderError(f"Qwen2.5-VL text encoder: {error}") from None
        hidden = hidden_size(config)
        if expected_dim is not None and hidden != expected_dim:
            raise TextEncoderError(
                f"the Qwen model in {file} has hidden size {hidden}, but the DiT expects {expected_dim}"
            )
        self.folder, self.single_file = None, file
        self.tokenizer = packaged_qwen_tokenizer()
        with quiet_transformers():  # its load report flags the lm_head of a file without one
            self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                None, config=Qwen2_5_VLConfig(**config), state_dict=state, dtype=dtype
            )
        self.model.generation_config = GenerationConfig(**QWEN_GENERATION)
        self._finish(fp8, hidden)

    def _finish(self, fp8: bool, hidden: int) -> None:
        if fp8:  # the language model's Linear layers (nearly all of its weights), quantized before moving
            quantize_linears(self.model, lambda name: "language_model" in name and ".layers." in name)
        self.model.to(self.device).eval().requires_grad_(False)
        self.hidden_size = hidden

    def crop_length(self, template: PromptTemplate) -> int:
        """Tokens before the prompt: the template prefix (plus the official extra crop of image_edit)."""
        prefix_ids = self.tokenizer(template.prefix, add_special_tokens=False)["input_ids"]
        return len(prefix_ids) + template.extra_crop

    def _image_processor(self):
        if self._processor is None:
            try:  # transformers 5: the PIL implementation needs no torchvision
                from transformers import Qwen2VLImageProcessorPil as processor_class
            except ImportError:
                from transformers import Qwen2VLImageProcessor as processor_class
            if self.single_file is not None:  # Qwen2.5-VL's own preprocessing settings
                self._processor = processor_class(**IMAGE_PROCESSOR)
                return self._processor
            if not (self.folder / "preprocessor_config.json").exists():
                raise TextEncoderError(f"{self.folder} has no preprocessor_config.json, needed to read images")
            self._processor = processor_class.from_pretrained(self.folder)
        return self._processor

    def _inputs(self, prompts: list[str], template: PromptTemplate, max_length: int, images) -> dict:
        crop = self.crop_length(template)
        if template.name == "image_edit":
            texts = [edit_prompt_text(template, p, images is not None) for p in prompts]
        else:
            texts = [template.format(p) for p in prompts]
        if images is None:
            return self.tokenizer(
                texts,
                add_special_tokens=False,
                truncation=True,
                max_length=crop + max_length,
                padding="longest",
                return_tensors="pt",
            )
        # The image tokens follow the prompt, so nothing is truncated here (as in the official code).
        return self._with_images(texts, images)

    def _with_images(self, texts: list[str], images) -> dict:
        """Tokens of texts holding one image placeholder per image, with the images' vision inputs."""
        processor = self._image_processor()
        vision = processor(images=list(images), return_tensors="pt")
        # Each image stands for (t * h * w) / merge^2 tokens; the text holds one placeholder per image.
        counts = (vision["image_grid_thw"].prod(dim=1) // processor.merge_size**2).tolist()
        texts = [t.replace(IMAGE_PAD, IMAGE_PAD * n, 1) for t, n in zip(texts, counts, strict=True)]
        tokens = dict(self.tokenizer(texts, add_special_tokens=False, padding="longest", return_tensors="pt"))
        if "mm_token_type_ids" in inspect.signature(self.model.model.forward).parameters:
            # transformers 5 gives the image tokens their 2-D rotary positions only when told which they are
            # (its processor does this); without it they would get the positions of text
            tokens["mm_token_type_ids"] = (tokens["input_ids"] == self.model.config.image_token_id).int()
        return {**tokens, "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}

    @torch.no_grad()
    def answer_ids(self, text: str, image=None, max_new_tokens: int = 256) -> list[int]:
        """The token ids of Qwen's answer to a chat ``text`` (already in the chat format, the assistant's
        turn opened; an image placeholder in it if ``image`` is given), with the model's generation settings."""
        if image is None:
            inputs = dict(self.tokenizer([text], add_special_tokens=False, return_tensors="pt"))
        else:
            inputs = self._with_images([text], [image])
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        output = self.model.generate(**inputs, max_new_tokens=max_new_tokens)
        return output[0, inputs["input_ids"].shape[1] :].tolist()

    def generate(self, text: str, image=None, max_new_tokens: int = 256) -> str:
        """Qwen's answer (as answer_ids), decoded without special tokens as the official pipelines do."""
        answer = self.answer_ids(text, image, max_new_tokens)
        return self.tokenizer.decode(answer, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    @torch.no_grad()
    def encode(
        self, prompts: list[str], template: PromptTemplate, max_length: int, images: list | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings (B, L, hidden), mask (B, L)) of the prompts' tokens, L = the longest kept length."""
        inputs = self._inputs(prompts, template, max_length, images)
        crop = self.crop_length(template)
        model_inputs = {"input_ids": inputs["input_ids"].to(self.device)}
        if images is not None:  # with images the model needs the mask and the vision inputs
            model_inputs.update({k: v.to(self.device) for k, v in inputs.items() if k != "input_ids"})
        hidden = self.model.model(**model_inputs).last_hidden_state
        mask = inputs["attention_mask"][:, crop:].bool().to(self.device)
        if images is not None:
            mask[:, max_length:] = False
        length = max(int(mask.sum(dim=1).max()), 1)
        embeddings, mask = hidden[:, crop : crop + length], mask[:, :length]
        return embeddings * mask[..., None].to(embeddings.dtype), mask


LM_HEAD = "lm_head.weight"


def _weight_keys(folder: Path) -> set[str]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text()).get("weight_map", {}))
    keys = set()
    for file in folder.glob("*.safetensors"):
        with SafetensorsFile(file) as f:
            keys.update(f.keys())
    return keys


def lm_head_missing(path: str | Path) -> str | None:
    """Why the Qwen at ``path`` cannot write text (prompt expansion needs its language-model head), or
    None when it can. Read from the files' headers and config, before anything loads."""
    path = Path(path)
    try:
        if path.is_file():
            with SafetensorsFile(path) as f:
                if any(key.endswith(LM_HEAD) for key in f.keys()):
                    return None
            return f"{path} holds no {LM_HEAD} (the layer that turns Qwen's states into words)"
        config = json.loads((path / "config.json").read_text())
        if config.get("tie_word_embeddings") or (config.get("text_config") or {}).get("tie_word_embeddings"):
            return None  # the head is the token embedding
        if any(key.endswith(LM_HEAD) for key in _weight_keys(path)):
            return None
        return f"the weights in {path} hold no {LM_HEAD} (the layer that turns Qwen's states into words)"
    except (OSError, ValueError) as error:
        return f"cannot read {path}: {error}"


def _clip_config_from_weights(state: dict[str, torch.Tensor]) -> CLIPTextConfig:
    """CLIP text config read off the tensor shapes of bare keys (heads: CLIP's head width is 64)."""
    vocab, hidden = state["embeddings.token_embedding.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        max_position_embeddings=state["embeddings.position_embedding.weight"].shape[0],
        hidden_act="quick_gelu",
        bos_token_id=0,  # as openai/clip-vit-large-patch14: eos_token_id 2 selects the pooled token by argmax
        eos_token_id=2,
        pad_token_id=1,
    )


def bare_clip_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text weights keyed without any wrapper or ``text_model.`` prefix, unused tensors dropped."""
    for prefix in CLIP_KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in CLIP_UNUSED_KEYS}


def _load_single_file_clip(file: Path) -> CLIPTextModel:
    try:
        state = bare_clip_keys(load_file(str(file)))
    except Exception as error:
        raise TextEncoderError(f"cannot read CLIP weights {file}: {error}") from None
    if "embeddings.token_embedding.weight" not in state:
        raise TextEncoderError(f"{file} does not hold a CLIP text model (no token embedding weight)")
    model = CLIPTextModel(_clip_config_from_weights(state))
    if all(k.startswith("text_model.") for k in model.state_dict()):  # transformers 4 nests the text tower
        state = {f"text_model.{k}": v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise TextEncoderError(
            f"{file} does not fit a CLIP text model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model


class ClipEncoder:
    """CLIP-L text tower from a Hugging Face folder, a folder holding ``clip_l.safetensors``, or that file."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", expected_dim: int | None = None):
        hint = f"Download clip_l.safetensors (ComfyUI repackage) or {CLIP_MODEL} and pass its file or folder."
        path = local_path(path, "CLIP text encoder", hint)
        if path.is_dir() and (path / "config.json").exists():
            model = CLIPTextModel.from_pretrained(path, dtype=torch.float32, local_files_only=True)
            has_tokenizer = any((path / name).exists() for name in TOKENIZER_FILES)
            tokenizer = CLIPTokenizer.from_pretrained(path) if has_tokenizer else packaged_clip_tokenizer()
        else:
            file = path
            if path.is_dir():
                files = sorted(path.glob("*.safetensors"))
                if len(files) != 1:
                    raise TextEncoderError(
                        f"CLIP text encoder: {path} should hold config.json or one .safetensors "
                        f"file (clip_l.safetensors); found {[f.name for f in files]}"
                    )
                file = files[0]
            model = _load_single_file_clip(file)
            tokenizer = packaged_clip_tokenizer()
        self.hidden_size = model.config.hidden_size
        if expected_dim is not None and self.hidden_size != expected_dim:
            raise TextEncoderError(
                f"the CLIP model at {path} has hidden size {self.hidden_size}, but the DiT expects {expected_dim} "
                f"(Kandinsky 5 uses CLIP ViT-L/14, 768)."
            )
        self.device = torch.device(device)
        self.model = model.to(self.device, torch.float32).eval().requires_grad_(False)
        self.tokenizer = tokenizer

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, max_length=CLIP_MAX_LENGTH, padding="max_length", truncation=True, return_tensors="pt"
        )
        return self.model(input_ids=tokens["input_ids"].to(self.device)).pooler_output.float()


class PromptEncoder:
    """Both encoders together, for a task: what the DiT takes as text, text_mask and pooled_text."""

    def __init__(self, qwen: QwenEncoder, clip: ClipEncoder):
        self.qwen, self.clip = qwen, clip

    def encode(
        self, prompts: list[str], template: PromptTemplate, max_length: int, images: list | None = None
    ) -> EncodedPrompts:
        embeddings, mask = self.qwen.encode(prompts, template, max_length, images)
        return EncodedPrompts(embeddings, mask, self.clip.encode(prompts), template.name)


def load_prompt_encoder(
    qwen_path: str | Path, clip_path: str | Path, task_params, device, text_encoder_dtype: str = "bfloat16"
) -> PromptEncoder:
    """Qwen (``text_encoder_dtype``: a float dtype name, or "fp8" for fp8 weights computed in bf16) and CLIP,
    both checked against the text widths of the task's DiT."""
    fp8 = text_encoder_dtype == "fp8"
    dtype = torch.bfloat16 if fp8 else TEXT_ENCODER_DTYPES[text_encoder_dtype]
    qwen = QwenEncoder(qwen_path, device, dtype, expected_dim=task_params["in_text_dim"], fp8=fp8)
    clip = ClipEncoder(clip_path, device, expected_dim=task_params["in_text_dim2"])
    return PromptEncoder(qwen, clip)
