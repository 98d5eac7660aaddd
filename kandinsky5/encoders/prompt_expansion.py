"""Prompt expansion, as the official pipelines do by default (``expand_prompts=True``).

Before encoding, the same Qwen2.5-VL-7B-Instruct that encodes the prompt rewrites it: one user
message holding the task's instruction (with the typed prompt in it) and, for I2V and I2I, the
image; Qwen answers (at most 256 new tokens, with the model's own generation settings, after
``transformers.set_seed(seed)``) and the answer, decoded without special tokens, is the prompt
that gets encoded. A LoRA's trigger word goes directly before the answer (the official video
pipelines read it from the LoRA file's ``trigger`` metadata).

The instructions below are the official pipelines' own texts, character for character (their
typos and indentation included): Qwen reads them as they are, so any change changes the answer.
"""

from __future__ import annotations

from PIL import Image

MAX_NEW_TOKENS = 256
SYSTEM_MESSAGE = "You are a helpful assistant."  # Qwen2.5-VL's chat template adds it when none is given
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"

# Qwen2.5-VL-7B-Instruct's generation_config.json, for a single-file Qwen (a folder brings its own).
QWEN_GENERATION = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "eos_token_id": [151645, 151643],
    "do_sample": True,
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_k": 1,
    "top_p": 0.001,
}

# kandinsky/t2v_pipeline.py, Kandinsky5T2VPipeline.expand_prompt
T2V_INSTRUCTION = """You are a prompt beautifier that transforms short user video descriptions into rich, detailed English prompts specifically optimized for video generation models.
        Here are some example descriptions from the dataset that the model was trained:
        1. "In a dimly lit room with a cluttered background, papers are pinned to the wall and various objects rest on a desk. Three men stand present: one wearing a red sweater, another in a black sweater, and the third in a gray shirt. The man in the gray shirt speaks and makes hand gestures, while the other two men look forward. The camera remains stationary, focusing on the three men throughout the sequence. A gritty and realistic visual style prevails, marked by a greenish tint that contributes to a moody atmosphere. Low lighting casts shadows, enhancing the tense mood of the scene."
        2. "In an office setting, a man sits at a desk wearing a gray sweater and seated in a black office chair. A wooden cabinet with framed pictures stands beside him, alongside a small plant and a lit desk lamp. Engaged in a conversation, he makes various hand gestures to emphasize his points. His hands move in different positions, indicating different ideas or points. The camera remains stationary, focusing on the man throughout. Warm lighting creates a cozy atmosphere. The man appears to be explaining something. The overall visual style is professional and polished, suitable for a business or educational context."
        3. "A person works on a wooden object resembling a sunburst pattern, holding it in their left hand while using their right hand to insert a thin wire into the gaps between the wooden pieces. The background features a natural outdoor setting with greenery and a tree trunk visible. The camera stays focused on the hands and the wooden object throughout, capturing the detailed process of assembling the wooden structure. The person carefully threads the wire through the gaps, ensuring the wooden pieces are securely fastened together. The scene unfolds with a naturalistic and instructional style, emphasizing the craftsmanship and the methodical steps taken to complete the task."
        IImportantly! These are just examples from a large training dataset of 200 million videos.
        Rewrite Prompt: "{prompt}" to get high-quality video generation. Answer only with expanded prompt."""  # noqa: E501

# kandinsky/models/text_embedders.py, Qwen2_5_VLTextEmbedder.INSTRUCTION_I2V_EXPAND
I2V_INSTRUCTION = """You are a prompt beautifier that transforms short user video descriptions into rich, detailed English prompts specifically optimized for video generation models.
    Here are some example descriptions from the dataset that the model was trained:
    1. "Create a video showing a nighttime urban driving scene from inside a car. The driver is focused on the road ahead, with the city lights visible through the windshield. The GPS device on the dashboard continues to display navigation information. The camera remains steady, capturing the interior of the car and the changing street view outside as the vehicle moves forward. The background shifts slightly to show different parts of the cityscape, including illuminated buildings and street signs."
    2. "Create a video where the character, dressed in historical attire, is seen holding an umbrella with a logo. The character should move closer to the camera while maintaining a steady pace, keeping the umbrella raised. The background remains consistent with a foggy, outdoor setting, but the focus shifts more towards the character as they approach. The lighting should emphasize the details of the costume and the umbrella, enhancing the dramatic effect."
    3. "Darken the scene while keeping the characters and setting unchanged, emphasizing a serious atmosphere."
    IImportantly! These are just examples from a large training dataset of 20 mln videos.
    Rewrite Prompt: "{prompt}" to get high-quality image to video generation from this image. Pay main attention to information about changes of objects.
    Make prompt dynamic. Answer only with expanded prompt."""  # noqa: E501

# kandinsky/t2i_pipeline.py, Kandinsky5T2IPipeline.expand_prompt
T2I_INSTRUCTION = """Rewrite and enhance the original prompt with richer detail, clearer structure, and improved descriptive quality. Expand the scene, atmosphere, and context while preserving the user\u2019s intent. When adding text that should appear inside an image, place that text inside double quotes and in capital letters. Strengthen visual clarity, style, and specificity, but do not change the meaning. Output only the enhanced prompt, written in polished, vivid language suitable for high-quality image generation.
        example:
        Original text: white mini police car with blue stripes, with 911 and 'Police' text 
        Result: A miniature model car simulating the official transport of the relevant authorities. The body is white with blue stripes. The word "911" is written in large blue letters on the hood and side. Below it, "POLICE" is used in a font. The windows are transparent, and the interior has black seats. The headlights have plastic lenses, and the roof has blue and red beacons. The radiator grille has vertical slots. The wheels are black with white rims. The doors are closed, the windows have black frames. The background is uniform white.
        Here 911 in double quotes because it is text on image, 'Police' -> "POLICE" because it should be in double quotes and capital letters.
        Rewrite Prompt: "{prompt}". Answer only with expanded prompt."""  # noqa: E501, W291

# kandinsky/i2i_pipeline.py, Kandinsky5I2IPipeline.expand_prompt
I2I_INSTRUCTION = """Rewrite and enhance the original editing instruction with richer detail, clearer structure, and improved descriptive quality. When adding text that should appear inside an image, place that text inside double quotes and in capital letters. Explain what needs to be changed and what needs to be left unchanged. Explain in details how to change  camera potision or tell that camera position shouldn't be changed.
example:
Original text: add text 911 and 'Police' 
Result: Add the word "911" in large blue letters to the hood. Below that, add the word "POLICE." Keep the camera position unchanged, as do the background, car position, and lighting.
Rewrite Prompt: "{prompt}". Answer only with expanded prompt."""  # noqa: E501, W291

INSTRUCTIONS = {"t2v": T2V_INSTRUCTION, "i2v": I2V_INSTRUCTION, "t2i": T2I_INSTRUCTION, "i2i": I2I_INSTRUCTION}


def instruction(kind: str, prompt: str) -> str:
    """The task's instruction with the typed prompt in its place (inserted as it is, braces included)."""
    return INSTRUCTIONS[kind].replace("{prompt}", prompt)


def expansion_image(kind: str, image: Image.Image | None) -> Image.Image | None:
    """What Qwen is shown: I2V the first frame as given, I2I the source at a quarter of its sides, others none."""
    if image is None or kind not in ("i2v", "i2i"):
        return None
    image = image.convert("RGB")
    if kind == "i2i":
        return image.resize((image.width // 4, image.height // 4))
    return image


def chat_text(kind: str, prompt: str, with_image: bool) -> str:
    """The message as Qwen2.5-VL's chat template writes it, the assistant's turn opened: the I2V image
    comes before the instruction, the I2I image after it (as in the official messages)."""
    content = instruction(kind, prompt)
    if with_image:
        content = IMAGE_PLACEHOLDER + content if kind == "i2v" else content + IMAGE_PLACEHOLDER
    return (
        f"<|im_start|>system\n{SYSTEM_MESSAGE}<|im_end|>\n"
        f"<|im_start|>user\n{content}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def stored_trigger(word: str) -> str:
    """The trigger word as the LoRA file stores it: followed by a space, because the official pipelines
    (and generation here) put the stored text directly before the expanded prompt."""
    return word if word[-1:].isspace() else word + " "


def with_trigger(trigger: str, expanded: str) -> str:
    """The official video pipelines' placement: the trigger directly before the expanded prompt."""
    return trigger + expanded


def expand_prompt(qwen, kind: str, prompt: str, image: Image.Image | None, seed: int) -> str:
    """Qwen's rewrite of ``prompt`` for a task ``kind`` ("t2v", "i2v", "t2i", "i2i"), ``image`` the I2V
    first frame or I2I source; ``qwen`` a loaded QwenEncoder. Seeded as the official pipelines seed it."""
    import transformers

    transformers.set_seed(seed)
    shown = expansion_image(kind, image)
    return qwen.generate(chat_text(kind, prompt, shown is not None), shown, MAX_NEW_TOKENS)
