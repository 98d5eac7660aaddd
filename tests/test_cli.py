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


@pytest.mark.parametrize(
    "script, flag, package",
    [
        ("kandinsky5_generate_video.py", "--xformers", "xformers"),
        ("kandinsky5_generate_video.py", "--flash_attn", "flash-attn"),
        ("kandinsky5_train_network.py", "--flash_attn", "flash-attn"),
        ("kandinsky5_train_network.py", "--sage_attn", "sageattention"),
    ],
)
def test_missing_attention_backend_is_one_line_before_anything_loads(script, flag, package, tmp_path):
    """The weights, data and encoders given do not exist: the backend is checked before any of them."""
    result = run(
        script,
        "--task",
        "tiny-t2v",
        flag,
        *(["--prompt", "x", "--text_encoder_qwen", "absent"] if "generate" in script else []),
        *(["--dataset_config", "absent.toml", "--output_dir", str(tmp_path / "out")] if "train" in script else []),
        "--dit",
        "absent.safetensors",
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: attention backend")
    assert f"needs the package '{package}'" in result.stderr
    assert "absent" not in result.stderr
