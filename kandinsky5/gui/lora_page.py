"""The LoRA page: convert between layouts and merge into a DiT, as `python -m kandinsky5.lora_tools` does
(its own entry point runs)."""

from __future__ import annotations

import gradio as gr

from kandinsky5 import lora_tools
from kandinsky5.gui.runs import CommandFailed, run_command

# (what the user picks, the lora_tools command): ComfyUI and musubi-tuner read the kohya layout
CONVERSIONS = [
    ("for ComfyUI and musubi-tuner (kohya layout)", "to-kohya"),
    ("for diffusers (PEFT layout)", "to-diffusers"),
    ("for the official code (a folder)", "to-official"),
]


def _run(argv: list[str]) -> str:
    try:
        return run_command(lora_tools.main, argv).strip() or "done"
    except CommandFailed as failure:
        raise gr.Error(str(failure)) from None


def build() -> None:
    with gr.Row():
        with gr.Column():
            gr.Markdown("**Convert** a LoRA file for another program (kohya, diffusers/PEFT or official layout)")
            mode = gr.Dropdown(CONVERSIONS, value="to-kohya", label="Conversion")
            source = gr.Textbox(label="LoRA file")
            target = gr.Textbox(label="Output (a file; a folder for to-official)")
            convert = gr.Button("Convert")
            converted = gr.Textbox(label="Result", interactive=False)
        with gr.Column():
            gr.Markdown("**Merge** LoRAs into a DiT checkpoint")
            dit = gr.Textbox(label="DiT checkpoint")
            lora = gr.Textbox(label="LoRA file")
            multiplier = gr.Number(label="Strength", value=1.0)
            output = gr.Textbox(label="Output checkpoint")
            fp8 = gr.Checkbox(label="write fp8 weights")
            merge = gr.Button("Merge")
            merged = gr.Textbox(label="Result", interactive=False)

    convert.click(lambda m, s, t: _run([m, s, t]), [mode, source, target], converted, api_name="lora_convert")

    def do_merge(dit_path, lora_path, strength, output_path, to_fp8):
        argv = ["merge", "--dit", dit_path, "--lora", lora_path, "--multiplier", str(strength), "--output", output_path]
        return _run(argv + (["--fp8"] if to_fp8 else []))

    merge.click(do_merge, [dit, lora, multiplier, output, fp8], merged, api_name="lora_merge")
