"""Every fenced shell example of README.md and docs/*.md, run as a user copies it, on the tiny tree.

The examples are read from the Markdown by this test, so an example is run the day it is written.
Each file's commands run in order in one workspace laid out as the docs assume (``weights/``,
``data/clips``, ``data/photos``, ``first.png``, ``photo.jpg``, ``prompts.txt``, a LoRA
``my_lora.safetensors``), each TOML example written where the text says it goes. The few commands
that cannot run here are listed in NOT_RUN with the reason; a listed command that no longer
appears in the docs fails the suite, so the list cannot go stale.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from kandinsky5.lora_tools import main as lora_tools
from kandinsky5.model.checkpoint import load_dit
from kandinsky5.model.tasks import get_task
from kandinsky5.tiny import build_comfy_tree
from networks.lora_kandinsky import create_network

from .acceptance import ROOT, check, make_workspace, run, split_commands, tiny_command
from .training_helpers import running_until

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# Commands (by their start) that are not run, and why.
NOT_RUN = {
    "bash .ci/demo": "installs the project into .venv with pip before it generates (CI's own set-up step)",
    "bash .ci/run": "the test suite itself",
    "python -m venv .venv": "installation",
    "pip install torch": "installation",
    'pip install -e ".[test]"': "installation",
    "python -m pytest -q": "the test suite itself",
    "python benchmarks/run_all.py": "full-size benchmarks, minutes a case (tests/test_benchmarks.py runs them small)",
    "accelerate launch kandinsky5_train_network.py ...same options...": "'...' stands for a training command's options",
    "accelerate launch --multi_gpu --num_processes 4": "needs 4 GPUs ('...' stands for the options)",
    "accelerate launch --config_file examples/accelerate/ddp.yaml": "'...' stands for the options (tests/test_fsdp.py "
    "runs this config with 2 CPU processes)",
    "accelerate launch --config_file examples/accelerate/fsdp.yaml": "'...' stands for the options (tests/test_fsdp.py "
    "runs this config with 2 CPU processes)",
    "accelerate launch --config_file examples/accelerate/sequence_parallel.yaml": "'...' stands for the options "
    "(tests/test_sequence_parallel_training.py runs this config with 2 and 4 CPU processes)",
    "accelerate launch --config_file examples/accelerate/fsdp_two_nodes.yaml": "needs two machines",
    "accelerate launch --multi_gpu --num_machines 2": "needs two machines",
    "... --sample_prompts": "options to add to a training command ('...')",
    ". .venv/bin/activate && python kandinsky5_gui.py": "serves the web UI until stopped (tests/test_gui.py serves it)",
    "python kandinsky5_gui.py": "serves the web UI until stopped (tests/test_gui.py serves it)",
    "python -m kandinsky5.download": "downloads tens of GB (tests/test_download.py runs it offline on a pre-filled "
    "Hugging Face cache)",
}
# TOML examples and the file the text puts them in.
TOML_FILES = {"dataset_config.md": ["data.toml"], "training.md": ["data/clips.toml", "data/edits.toml"]}


def fenced(path: Path, languages: tuple[str, ...]) -> list[str]:
    return [body for language, body in FENCE.findall(path.read_text()) if language in languages]


def commands(path: Path) -> list[str]:
    return [command for block in fenced(path, ("bash", "sh", "shell")) for command in split_commands(block)]


def not_run_reason(command: str) -> str | None:
    return next((reason for start, reason in NOT_RUN.items() if command.startswith(start)), None)


def small_toml(text: str) -> str:
    """A docs dataset config with the sizes made small."""
    text = re.sub(r"resolution = \[\d+, \d+\]", "resolution = [64, 48]", text)
    return re.sub(r"target_frames = \[[\d, ]+\]", "target_frames = [9, 13]", text)


def write_lora(tree: Path, task: str, dit: str, path: Path) -> None:
    """A LoRA of random (non-zero) weights for ``task``'s tiny DiT."""
    model = load_dit(tree / "model" / f"{dit}.safetensors", get_task(task), dtype=torch.float32)
    network = create_network(model, 4, 4, 0.0, None)
    with torch.no_grad():
        for module in network.loras.values():
            module.lora_up.weight.normal_(0, 0.02)
    network.save(path, {"ss_network_dim": "4"})


@pytest.fixture(scope="module")
def docs_workspace(tiny_tree, tmp_path_factory):
    folder = make_workspace(tiny_tree, tmp_path_factory.mktemp("docs"))
    build_comfy_tree(folder / "ComfyUI" / "models")  # the ComfyUI install weights.md points at
    write_lora(folder / "weights", "tiny-t2v", "tiny_t2v", folder / "my_lora.safetensors")
    lora_tools(["to-diffusers", str(folder / "my_lora.safetensors"), str(folder / "some_peft_lora.safetensors")])
    for name, targets in TOML_FILES.items():
        for toml, target in zip(fenced(ROOT / "docs" / name, ("toml",)), targets, strict=True):
            (folder / target).write_text(small_toml(toml))
    return folder


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_example_of_the_doc_runs(doc, docs_workspace):
    ran = 0
    for text in commands(doc):
        if not_run_reason(text):
            continue
        command = tiny_command(text, docs_workspace)
        check(run(command.argv, docs_workspace), f"{doc.name}: {text}")
        ran += 1
    if doc.name in ("training.md", "inference.md", "runs.md", "dataset_config.md"):
        assert ran > 0, f"{doc.name}: no example ran"


def test_the_examples_wrote_what_the_docs_say(docs_workspace):
    """Run after the docs' tests (pytest keeps file order): the files the examples promise exist."""
    expected = [
        "cat.mp4",
        "quick.mp4",
        "waves.mp4",
        "pro.mp4",
        "apple.png",
        "winter.png",
        "output/walk_lora.safetensors",
        "output/walk_wandb.safetensors",
        "output/musubi_style.safetensors",
        "walk.mp4",
        "my_lora_diffusers.safetensors",
        "my_lora_official",
        "as_kohya.safetensors",
        "lite_with_my_lora.safetensors",
        "output/winter_edit.safetensors",
        "winter_edit.png",
        "comfy_fox.mp4",
        "pro_on_24gb.mp4",
        "output/vram_lora.safetensors",
        "typed.mp4",
        "output/zxq_style.safetensors",
        "zxq.mp4",
        "output/walk_lokr.safetensors",
        "lokr.mp4",
        "output/walk_ema-ema.safetensors",
        "output/walk_post_hoc.safetensors",
        "data/edits/sources/cat_001.txt",  # dataset_config.md's captioning
        "first_last.mp4",
        "loop.mp4",
        "output/walk_first_last.safetensors",
    ]
    missing = [name for name in expected if not (docs_workspace / name).exists()]
    assert not missing, missing
    from safetensors import safe_open

    from kandinsky5.inference.media import read_metadata

    with safe_open(str(docs_workspace / "output/zxq_style.safetensors"), "pt") as f:
        assert f.metadata()["trigger"] == "zxq style, "  # training.md's trigger word, as inference.md says
    assert read_metadata(docs_workspace / "zxq.mp4")["expanded_prompt"].startswith("zxq style, ")
    assert read_metadata(docs_workspace / "typed.mp4")["expanded_prompt"] is None
    assert (docs_workspace / "data/edits/sources/cat_002.txt").read_text().startswith("zxq style, ")
    assert len(list((docs_workspace / "out_folder").iterdir())) == 2  # one file per prompt line
    assert list((docs_workspace / "logs").rglob("events.out.tfevents.*"))
    assert list((docs_workspace / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_every_command_not_run_is_in_the_docs():
    texts = [text for doc in DOCS for text in commands(doc)]
    for start in NOT_RUN:
        assert any(text.startswith(start) for text in texts), f"NOT_RUN lists {start!r}, which no doc shows any more"


def test_the_docs_have_examples_to_run():
    runnable = [text for doc in DOCS for text in commands(doc) if not not_run_reason(text)]
    assert len(runnable) >= 15, runnable


def test_ctrl_c_under_the_docs_accelerate_launch_ends_with_the_resume_command(docs_workspace):
    """The worked example's training command under accelerate launch, stopped as a terminal's Ctrl-C stops
    it (SIGINT to the launcher and the training process alike): one notice, a state saved, and the last
    line is the --resume command, which then continues the run."""
    import os
    import signal

    steps = commands(ROOT / "docs" / "training.md")
    for caching in [t for t in steps if "kandinsky5_cache_" in t and "data/clips.toml" in t]:  # the walk's caches
        check(run(tiny_command(caching, docs_workspace).argv, docs_workspace), caching)
    (text,) = [t for t in steps if "--output_name walk_lora" in t]
    argv = tiny_command(text, docs_workspace).argv
    argv[argv.index("--max_train_epochs") + 1] = "100000"  # a run that is still going when Ctrl-C comes
    argv += ["--output_name", "ctrl_c", "--save_every_n_steps", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    saved = docs_workspace / "output" / "ctrl_c-step00000002.safetensors"
    # Ctrl-C as in a terminal, where SIGINT has its default action: a test run started in the background
    # of a shell without job control inherits SIGINT ignored, and the launcher would not see it
    default = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = running_until(argv, saved, 300, cwd=docs_workspace, env=env, start_new_session=True, preexec_fn=default)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process of the group
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "CalledProcessError" not in stderr
    assert (stdout + stderr).count("stopping after this step") == 1
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"interrupted at step (\d+); continue with --resume (\S+)", last)
    assert match, stderr[-2000:]
    state = Path(match[2])
    assert (docs_workspace / state / "train_state.json").exists() or (state / "train_state.json").exists()
    resumed = [*argv, "--resume", match[2]]
    resumed[resumed.index("--max_train_epochs") + 1] = "1"
    resumed[resumed.index("--max_train_epochs")] = "--max_train_steps"
    resumed[resumed.index("--max_train_steps") + 1] = str(int(match[1]) + 1)
    result = run(resumed, docs_workspace)
    check(result, "the --resume command")
    assert f"resuming from {match[2]}: step {match[1]}" in result.stdout
