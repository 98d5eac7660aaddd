"""The Generate page: the options of kandinsky5_generate_video.py as a form; the run is that script's
own entry point, so a generation here is the command line's to the bit."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

import kandinsky5_generate_video
from kandinsky5.gui.presets import VRAM_CHOICES, generation_preset
from kandinsky5.gui.runs import CommandFailed, run_command
from kandinsky5.inference.media import read_metadata
from kandinsky5.model.tasks import TASKS, get_task

MEDIA = (".mp4", ".png")


def generation_argv(settings: dict, output: Path) -> list[str]:
    """The command line of one generation from the form's values (empty fields: the task's defaults)."""
    argv = ["--task", settings["task"], "--prompt", settings["prompt"], "--output", str(output)]
    argv += ["--seed", str(int(settings["seed"]))]
    for option in ("negative_prompt", "image", "image_last", "dit", "vae", "text_encoder_qwen", "text_encoder_clip"):
        if settings.get(option):
            argv += [f"--{option}", str(settings[option])]
    if settings.get("comfy_models_dir"):
        argv += ["--comfy_models_dir", settings["comfy_models_dir"]]
    for option in ("width", "height", "frames", "steps"):
        if settings.get(option):
            argv += [f"--{option}", str(int(settings[option]))]
    if settings.get("guidance"):  # an empty field (shown as 0): the task's guidance
        argv += ["--guidance", str(settings["guidance"])]
    if settings.get("loop"):
        argv.append("--loop")
    if settings.get("fp8"):
        argv.append("--fp8_base")
    if settings.get("blocks_to_swap"):
        argv += ["--blocks_to_swap", str(int(settings["blocks_to_swap"]))]
    loras = [line.rsplit(":", 1) for line in (settings.get("loras") or "").splitlines() if line.strip()]
    if loras:
        argv += ["--lora_weight", *(path.strip() for path, *_ in loras)]
        argv += ["--lora_multiplier", *(rest[0].strip() if rest else "1.0" for _, *rest in loras)]
    argv += ["--dtype", settings.get("dtype") or "bfloat16"]
    if settings.get("expand_prompt") is False:  # the checkbox cleared: the prompt as typed
        argv.append("--no_expand_prompt")
    return argv


def output_path(folder: Path, task_name: str, seed: int) -> Path:
    extension = ".mp4" if get_task(task_name).is_video else ".png"
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}_{seed}{extension}"


def past_results(folder: Path) -> list[Path]:
    """The generated files in the output folder, newest first."""
    if not folder.is_dir():
        return []
    files = [p for p in folder.iterdir() if p.suffix in MEDIA and not p.name.startswith(".")]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def settings_of(path: str) -> dict:
    """The settings a result was made with, from the metadata written into the file."""
    try:
        return read_metadata(path)
    except (OSError, KeyError, ValueError) as error:
        raise gr.Error(f"{path}: no generation settings in this file ({error})") from None


def form_values(settings: dict) -> list:
    """The Generate form's task, prompt, negative prompt, image, LoRAs, width, height, frames, steps,
    guidance, seed, DiT and prompt expansion from a result's settings."""
    loras = "\n".join(f"{lora['path']}:{lora['multiplier']}" for lora in settings.get("loras", []))
    keys = ("task", "prompt", "negative_prompt", "image")
    numbers = ("width", "height", "frames", "steps", "guidance", "seed")
    image = settings.get("image") or None
    if image and not Path(image).is_file():
        image = None  # the picture is gone: the form's image stays empty
    return [
        *(settings.get(k) or "" for k in keys[:3]),
        image,
        loras,
        *(settings.get(k) for k in numbers),
        settings.get("dit", ""),
        settings.get("expand_prompt", True),
    ]


def build(defaults: dict, output_folder: Path):
    """The page's widgets, inside the caller's gr.Blocks; ``defaults``: initial field values. Returns
    the LoRA box, which the Train page fills with a finished LoRA."""
    fields = [
        "task",
        "prompt",
        "negative_prompt",
        "image",
        "loras",
        "width",
        "height",
        "frames",
        "steps",
        "guidance",
        "seed",
        "fp8",
        "blocks_to_swap",
        "dit",
        "vae",
        "text_encoder_qwen",
        "text_encoder_clip",
        "comfy_models_dir",
        "dtype",
        "expand_prompt",
        "image_last",
        "loop",
    ]
    with gr.Row():
        with gr.Column():
            task = gr.Dropdown(list(TASKS), value=defaults.get("task", "k5-lite-t2v-5s-sd"), label="Task")
            prompt = gr.Textbox(label="Prompt", lines=3)
            expand = gr.Checkbox(
                value=True, label="Expand the prompt with Qwen first, as the official pipelines do (--expand_prompt)"
            )
            negative = gr.Textbox(label="Negative prompt (empty: the task's)")
            image = gr.Image(
                label="Image (I2V first frame or I2I source): drop a picture here", type="filepath", height=200
            )
            with gr.Accordion("I2V: last frame (with a LoRA trained for it)", open=False):
                image_last = gr.Image(label="Last frame (I2V): drop a picture here", type="filepath", height=160)
                loop = gr.Checkbox(label="Loop: the first image is the last frame too")
            loras = gr.Textbox(label="LoRAs: one per line, path:multiplier", lines=2)
            with gr.Row():
                width = gr.Number(
                    label="Width (0: the task's, or from the image)", precision=0, value=defaults.get("width", 0)
                )
                height = gr.Number(label="Height (0: as width)", precision=0, value=defaults.get("height", 0))
                frames = gr.Number(label="Frames", precision=0, value=defaults.get("frames"))
            with gr.Row():
                steps = gr.Number(label="Steps", precision=0, value=defaults.get("steps"))
                guidance = gr.Number(label="Guidance (0: the task's)", value=0)
                seed = gr.Number(label="Seed", precision=0, value=42)
            with gr.Accordion("Memory and weights", open=False):
                vram = gr.Dropdown(VRAM_CHOICES, value="24 GB", label="GPU memory preset (fills the two below)")
                fp8 = gr.Checkbox(label="fp8 DiT weights (--fp8_base)")
                blocks = gr.Number(label="Blocks to swap to CPU memory", precision=0, value=0)
                dit = gr.Textbox(label="DiT (--dit)", value=defaults.get("dit", ""))
                vae = gr.Textbox(label="VAE (--vae)", value=defaults.get("vae", ""))
                qwen = gr.Textbox(label="Qwen2.5-VL (--text_encoder_qwen)", value=defaults.get("text_encoder_qwen", ""))
                clip = gr.Textbox(label="CLIP-L (--text_encoder_clip)", value=defaults.get("text_encoder_clip", ""))
                comfy = gr.Textbox(label="ComfyUI models folder (--comfy_models_dir)", value="")
                dtype = gr.Dropdown(
                    ["bfloat16", "float16", "float32"], value=defaults.get("dtype", "bfloat16"), label="DiT dtype"
                )
            run = gr.Button("Generate", variant="primary")
        with gr.Column():
            video = gr.Video(label="Video", visible=True)
            picture = gr.Image(label="Image", type="filepath")
            expanded = gr.Textbox(label="Expanded prompt (what was encoded)", interactive=False)
            settings_out = gr.JSON(label="Settings of this result")
            gallery = gr.Gallery(label="Past results", value=[str(p) for p in past_results(output_folder)])
            chosen = gr.Textbox(label="Chosen result", interactive=True)
            with gr.Row():
                show = gr.Button("Show its settings")
                reuse = gr.Button("Use these settings again")

    inputs = [task, prompt, negative, image, loras, width, height, frames, steps, guidance, seed, fp8, blocks]
    inputs += [dit, vae, qwen, clip, comfy, dtype, expand, image_last, loop]

    def generate(*values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (gradio's progress hook)
        settings = dict(zip(fields, values, strict=True))
        if not (settings["prompt"] or "").strip():
            raise gr.Error("write a prompt first")
        output = output_path(output_folder, settings["task"], int(settings["seed"] or 42))
        try:
            run_command(kandinsky5_generate_video.main, generation_argv(settings, output))
        except CommandFailed as failure:
            raise gr.Error(str(failure)) from None
        media = str(output)
        shown = (media, None) if output.suffix == ".mp4" else (None, media)
        made = settings_of(media)
        return *shown, made.get("expanded_prompt") or "", made, [str(p) for p in past_results(output_folder)]

    run.click(generate, inputs, [video, picture, expanded, settings_out, gallery], api_name="generate")

    def choose(event: gr.SelectData):
        results = past_results(output_folder)
        return str(results[event.index]) if event.index < len(results) else ""

    gallery.select(choose, None, chosen)
    show.click(settings_of, chosen, settings_out, api_name="settings_of")
    form = [task, prompt, negative, image, loras, width, height, frames, steps, guidance, seed, dit, expand]
    reuse.click(lambda path: form_values(settings_of(path)), chosen, form, api_name="reuse_settings")
    vram.change(lambda t, v: generation_preset(t, v), [task, vram], [fp8, blocks])
    return loras
