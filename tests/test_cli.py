import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "kandinsky5_generate_video.py",
    "kandinsky5_cache_latents.py",
    "kandinsky5_cache_text_encoder_outputs.py",
    "kandinsky5_train_network.py",
    "_make_fp8_ckpt.py",
]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_entry_script_has_help(script):
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script}")


def test_help_lists_every_task_and_a_typo_gets_a_suggestion():
    help_text = run("kandinsky5_generate_video.py", "--help").stdout
    assert "k5-pro-i2v-5s-hd" in help_text and "k5-lite-t2i-hd" in help_text and "--from_file" in help_text
    result = run("kandinsky5_generate_video.py", "--task", "k5-pro-t2v-5s", "--prompt", "x")
    assert result.returncode == 2
    assert "unknown task 'k5-pro-t2v-5s'; did you mean 'k5-pro-t2v-5s-sd'" in result.stderr


def test_missing_attention_backend_is_named_before_any_model_loads(tiny_tree):
    result = run(
        "kandinsky5_generate_video.py",
        "--task",
        "tiny-t2v",
        "--xformers",
        "--prompt",
        "x",
        "--dit",
        str(tiny_tree / "model/tiny_t2v.safetensors"),
        "--text_encoder_qwen",
        "absent",
    )
    assert result.returncode == 1 and "attention backend 'xformers' needs the package 'xformers'" in result.stderr
