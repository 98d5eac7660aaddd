"""A web UI for generation and LoRA tools, in the browser (gradio).

    python kandinsky5_gui.py                 # http://127.0.0.1:7860, weights as in docs/weights.md
    python kandinsky5_gui.py --tiny          # try it offline with the tiny random models

Each page is a form over the same entry points the scripts have: Generate runs
kandinsky5_generate_video.py's; Train writes a project's captions and dataset config, runs both
caching scripts and launches kandinsky5_train_network.py as its own process (closing the page does
not stop it), with live curves, samples, stop and resume; LoRA runs `python -m kandinsky5.lora_tools`.
Paths are checked with the scripts' own messages. It listens on 127.0.0.1 only, unless --host says
otherwise; --share (a public gradio link) is off unless asked for.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from modules.option_types import ScriptParser

# nothing leaves this machine: gradio's usage statistics and version check stay off
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    p.add_argument(
        "--max_file_size",
        default="4gb",
        help="the largest file an upload may be, as gradio reads it (for example 500mb, 4gb; default 4gb)",
    )
    p.add_argument(
        "--allowed_host",
        action="append",
        default=[],
        help="a name the UI may be reached by besides this machine's names and --host (repeat for several; * for "
        "any). Requests naming other sites in Host or Origin are refused, which stops web pages elsewhere from "
        "driving the UI through DNS rebinding",
    )
    p.add_argument("--output_dir", default="outputs", help="where generated files go (default outputs)")
    p.add_argument(
        "--tiny",
        nargs="?",
        const="tiny_weights",
        help="use the tiny random models (written to this folder if missing; default tiny_weights, as the demo) and "
        "the tiny-t2v task: everything runs offline on a CPU in seconds",
    )
    return p


def tiny_defaults(folder: Path) -> dict:
    from kandinsky5.tiny import build_tiny_tree

    if not (folder / "model").is_dir():
        build_tiny_tree(folder)
    return {
        "task": "tiny-t2v",
        "dit": str(folder / "model" / "tiny_t2v.safetensors"),
        "vae": str(folder / "vae"),
        "text_encoder_qwen": str(folder / "text_encoder"),
        "text_encoder_clip": str(folder / "text_encoder2"),
        "frames": 9,
        "steps": 4,
        "dtype": "float32",
        "resolution": 64,
        "train_steps": 4,
        "every": 2,
        "sample_prompt": "a red fox --f 5 --s 2",
        "project": "projects/tiny_lora",
    }


def build_app(defaults: dict, output_dir: Path):
    import gradio as gr

    from kandinsky5.gui import generate_page, lora_page, train_page

    with gr.Blocks(title="Kandinsky 5 toolkit") as app:
        gr.Markdown("# Kandinsky 5 toolkit")
        with gr.Tab("Generate"):
            lora_box = generate_page.build(defaults, output_dir)
        with gr.Tab("Train"):
            train_page.build(defaults, lora_box)
        with gr.Tab("LoRA"):
            lora_page.build()
    return app


def serve(app, host: str, port: int | None, share: bool = False, allowed_host: tuple[str, ...] = (), **launch):
    """Launch the app with the Host/Origin check (kandinsky5/gui/host_check.py) in front of it."""
    from starlette.middleware import Middleware

    from kandinsky5.gui.host_check import HostCheck, allowed_names

    check = Middleware(HostCheck, names=allowed_names(host, tuple(allowed_host)), share=share)
    return app.queue().launch(
        server_name=host, server_port=port, share=share, quiet=True, app_kwargs={"middleware": [check]}, **launch
    )


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    # the files gradio serves are copied under the output folder, not into the system's temp folder
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(args.output_dir) / ".gradio"))
    defaults = tiny_defaults(Path(args.tiny)) if args.tiny else {}
    app = build_app(defaults, Path(args.output_dir))
    public = "" if args.share else "; --share adds a public gradio.live link"
    print(f"Kandinsky 5 toolkit: open http://{args.host}:{args.port} (Ctrl-C stops it{public})", flush=True)
    serve(app, args.host, args.port, args.share, tuple(args.allowed_host), max_file_size=args.max_file_size)


if __name__ == "__main__":
    main()
