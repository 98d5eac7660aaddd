"""The web UI served for real on localhost and driven through gradio's HTTP API (gradio_client): a
generation on the tiny tree, a script's error shown as the page's error, a LoRA conversion."""

from __future__ import annotations

import os
import socket

import av
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network in tests
pytest.importorskip("gradio", reason="the web UI needs gradio (pip install -e '.[gui]')")

import kandinsky5_gui  # noqa: E402

from .test_acceptance_docs import write_lora  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_tree, tmp_path_factory):
    from gradio_client import Client

    output = tmp_path_factory.mktemp("gui_outputs")
    app = kandinsky5_gui.build_app(kandinsky5_gui.tiny_defaults(tiny_tree), output)
    app.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield Client(app.local_url, verbose=False), output
    app.close()


def form(tree, **changes):
    values = dict(
        task="tiny-t2v", prompt="a red fox in the snow", negative_prompt="", image="", loras="", width=64, height=64,
        frames=9, steps=2, guidance=None, seed=7, fp8=False, blocks_to_swap=0,
        dit=str(tree / "model/tiny_t2v.safetensors"), vae=str(tree / "vae"),
        text_encoder_qwen=str(tree / "text_encoder"), text_encoder_clip=str(tree / "text_encoder2"),
        comfy_models_dir="", dtype="float32",
    )  # fmt: skip
    values.update(changes)
    return list(values.values())


def test_the_ui_listens_on_localhost_only_unless_told():
    args = kandinsky5_gui.parser().parse_args([])
    assert args.host == "127.0.0.1" and not args.share


def test_generate_writes_the_video_and_lists_it(served, tiny_tree):
    client, output = served
    video, picture, settings, gallery = client.predict(*form(tiny_tree), api_name="/generate")
    written = list(output.glob("*_7.mp4"))
    assert len(written) == 1 and picture is None and settings["prompt"] == "a red fox in the snow"
    with av.open(str(written[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9
    assert len(gallery) == 1


def test_a_bad_path_shows_the_scripts_message(served, tiny_tree, tmp_path):
    from gradio_client.exceptions import AppError

    client, _ = served
    with pytest.raises(AppError, match="does not exist"):
        client.predict(*form(tiny_tree, dit=str(tmp_path / "missing.safetensors")), api_name="/generate")


def test_lora_conversion_from_the_page(served, tiny_tree, tmp_path):
    client, _ = served
    lora = tmp_path / "walk.safetensors"
    write_lora(tiny_tree, "tiny-t2v", "tiny_t2v", lora)
    target = tmp_path / "walk_diffusers.safetensors"
    client.predict("to-diffusers", str(lora), str(target), api_name="/lora_convert")
    assert target.is_file()
