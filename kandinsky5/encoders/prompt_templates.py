"""The Qwen2.5-VL prompt templates Kandinsky 5 was trained with, copied exactly.

The spelling ("promt", "scren") is part of what the model was trained on and stays. A template's
text before ``{}`` (the system prompt and ``<|im_start|>user\\n``) is cut off the encoder output, so
the DiT sees the prompt's tokens (and the closing ``<|im_end|>``) as conditioned by the system prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

VISION_TOKENS = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    text: str  # with one "{}" where the prompt goes
    official_crop: int  # tokens the official code crops with the real Qwen vocabulary
    extra_crop: int = 0  # tokens cut beyond the template prefix (the official image_edit crop)

    @property
    def prefix(self) -> str:
        return self.text.split("{}")[0]

    def format(self, prompt: str) -> str:
        return self.text.format(prompt)


_VIDEO_SYSTEM = [
    "Describe how the camera moves or shakes, describe the zoom and view angle, whether it follows the objects.",
]
_VIDEO_TAIL = [
    "Describe the dynamism of the video and presented actions.",
    "Name the visual style of the video: whether it is a professional footage, user generated content, some kind of "
    "animation, video game or scren content.",
    "Describe the visual effects, postprocessing and transitions if they are presented in the video.",
    "Pay attention to the order of key actions shown in the scene.<|im_end|>",
    "<|im_start|>user",
    "{}<|im_end|>",
]

TEMPLATES = {
    "video": PromptTemplate(
        "video",
        "\n".join(
            ["<|im_start|>system", "You are a promt engineer. Describe the video in detail.", *_VIDEO_SYSTEM]
            + ["Describe the location of the video, main characters or objects and their action.", *_VIDEO_TAIL]
        ),
        official_crop=129,
    ),
    "image2video": PromptTemplate(
        "image2video",
        "\n".join(
            [
                "<|im_start|>system",
                "You are a promt engineer. Your task is to create a highly detailed and effective video description "
                "based on a provided input image.",
                *_VIDEO_SYSTEM,
                "Describe main characters actions.",
                *_VIDEO_TAIL,
            ]
        ),
        official_crop=132,
    ),
    "image": PromptTemplate(
        "image",
        "\n".join(
            [
                "<|im_start|>system",
                "You are a promt engineer. Describe the image by detailing the color, shape, size, texture, quantity, "
                "text, spatial relationships of the objects and background:<|im_end|>",
                "<|im_start|>user",
                "{}<|im_end|>",
            ]
        ),
        official_crop=41,
    ),
    # Used for image editing. Its prefix is 52 tokens with the real vocabulary, but the official code crops 55,
    # dropping the first 3 prompt tokens; the I2I model was trained that way, so we crop the same.
    "image_edit": PromptTemplate(
        "image_edit",
        "\n".join(
            [
                "<|im_start|>system",
                "You are a promt engineer. Based on the provided source image (first image) and target image (second "
                "image), create an interesting text prompt that can be used together with the source image to create "
                "the target image:<|im_end|>",
                "<|im_start|>user",
                "{}",
            ]
        ),
        official_crop=55,
        extra_crop=3,
    ),
}


def template_for(kind: str, frames: int, with_image: bool = True) -> PromptTemplate:
    """The template the official pipelines use: ``video`` for clips, ``image`` for single frames,
    ``image_edit`` for I2I with a source image (without one, the official I2I pipeline encodes with
    ``image``: text-to-image with the edit model). (Official I2V encodes with ``video``;
    ``image2video`` is unused by them.)"""
    if kind == "i2i" and with_image:
        return TEMPLATES["image_edit"]
    return TEMPLATES["video"] if frames > 1 else TEMPLATES["image"]


def edit_prompt_text(template: PromptTemplate, prompt: str, with_image: bool) -> str:
    """The image_edit template ends after the prompt; the source image's tokens (if any) and
    ``<|im_end|>`` follow."""
    return template.format(prompt) + (VISION_TOKENS if with_image else "") + "<|im_end|>"
