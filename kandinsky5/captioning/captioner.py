"""Qwen2.5-VL writing training captions for images and videos, a batch at a time.

The answer is greedy by default (the same captions every run); with a temperature it is sampled, seeded
with ``seed`` before each batch. Each caption is cleaned to one line of plain text (chat tokens and
line breaks removed) and given the ``prefix`` (a trigger word) in front.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from PIL import Image

from kandinsky5.encoders.prompt_expansion import IMAGE_PLACEHOLDER, SYSTEM_MESSAGE

from .qwen_vision import VideoSampling, bounded_image, video_inputs

VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
# Written for Kandinsky 5's captions, in the manner of the official prompt-expansion examples: one
# paragraph, the subject and action first, then the scene, light, camera and style.
DEFAULT_PROMPT = (
    "Write a caption of this {kind} for training a text-to-{kind} model. Write one paragraph of plain English "
    "in the present tense: first the main subject, its appearance and what it does, then the setting, the "
    "lighting and colours, the camera's framing{motion}, and the visual style (photograph, film still, 3D "
    "render, animation, painting). Put any visible text in double quotes. Describe only what is visible; do not "
    "begin with 'This {kind}' or 'The {kind} shows'. Answer with the caption only."
)


def default_prompt(kind: str) -> str:
    return DEFAULT_PROMPT.format(kind=kind, motion=" and movement" if kind == "video" else "")


def clean(text: str) -> str:
    """One line of plain text: chat tokens, markdown emphasis and line breaks gone, spaces collapsed."""
    text = re.sub(r"<\|[^|>]*\|>", " ", text)
    text = text.replace("**", "").replace("\ufffd", "")  # (a cut-off multi-byte character decodes to U+FFFD)
    return " ".join(text.split())


@dataclass
class Media:
    """An image, or a video's frames with their frame rate."""

    image: Image.Image | None = None
    frames: list[Image.Image] | None = None
    fps: float = 24.0

    @property
    def kind(self) -> str:
        return "image" if self.image is not None else "video"


@dataclass(frozen=True)
class CaptionSettings:
    prompt: str | None = None  # None: the default prompt of the item's kind; "{kind}" is replaced
    prefix: str = ""
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 42
    image_max_pixels: int = 768 * 28 * 28
    video: VideoSampling = VideoSampling()


def chat_text(instruction: str, placeholder: str) -> str:
    return (
        f"<|im_start|>system\n{SYSTEM_MESSAGE}<|im_end|>\n"
        f"<|im_start|>user\n{placeholder}{instruction}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


class Captioner:
    def __init__(self, qwen, settings: CaptionSettings):
        self.qwen, self.settings = qwen, settings

    def instruction(self, kind: str) -> str:
        prompt = self.settings.prompt
        return default_prompt(kind) if prompt is None else prompt.replace("{kind}", kind)

    def inputs(self, batch: list[Media]) -> dict[str, torch.Tensor]:
        """Token ids (left-padded), masks and the vision inputs of a batch, as Qwen2.5-VL's processor makes them."""
        qwen, texts, images, videos = self.qwen, [], [], []
        processor = qwen._image_processor()
        for media in batch:
            if media.kind == "image":
                vision = processor(images=[bounded_image(media.image, self.settings.image_max_pixels)],
                                   return_tensors="pt")  # fmt: skip
                images.append(vision)
                count = int(vision["image_grid_thw"].prod()) // processor.merge_size**2
                text = chat_text(self.instruction("image"), IMAGE_PLACEHOLDER).replace(IMAGE_PAD, IMAGE_PAD * count)
            else:
                vision = video_inputs(media.frames, media.fps, self.settings.video)
                videos.append(vision)
                count = int(vision["video_grid_thw"].prod()) // 4
                text = chat_text(self.instruction("video"), VIDEO_PLACEHOLDER).replace(VIDEO_PAD, VIDEO_PAD * count)
            texts.append(text)
        side = qwen.tokenizer.padding_side
        qwen.tokenizer.padding_side = "left"  # generation continues every row from its last token
        try:
            tokens = dict(qwen.tokenizer(texts, add_special_tokens=False, padding="longest", return_tensors="pt"))
        finally:
            qwen.tokenizer.padding_side = side
        config = qwen.model.config
        ids = tokens["input_ids"]
        tokens["mm_token_type_ids"] = (ids == config.image_token_id).int() + 2 * (ids == config.video_token_id).int()
        if images:
            tokens["pixel_values"] = torch.cat([v["pixel_values"] for v in images])
            tokens["image_grid_thw"] = torch.cat([v["image_grid_thw"] for v in images])
        if videos:
            tokens["pixel_values_videos"] = torch.cat([v["pixel_values_videos"] for v in videos])
            tokens["video_grid_thw"] = torch.cat([v["video_grid_thw"] for v in videos])
            tokens["second_per_grid_ts"] = torch.cat([v["second_per_grid_ts"] for v in videos])
        return tokens

    @torch.no_grad()
    def caption(self, batch: list[Media]) -> list[str]:
        import transformers

        settings = self.settings
        inputs = {k: v.to(self.qwen.device) for k, v in self.inputs(batch).items()}
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs:
                inputs[key] = inputs[key].to(self.qwen.model.dtype)
        transformers.set_seed(settings.seed)
        sampling = {"do_sample": True, "temperature": settings.temperature} if settings.temperature else {
            "do_sample": False, "temperature": None, "top_p": None, "top_k": None}  # fmt: skip
        output = self.qwen.model.generate(**inputs, max_new_tokens=settings.max_new_tokens, **sampling)
        answers = output[:, inputs["input_ids"].shape[1] :]
        texts = self.qwen.tokenizer.batch_decode(answers, skip_special_tokens=True)
        return [settings.prefix + clean(text) for text in texts]
