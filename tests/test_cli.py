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
    "kandinsky5_caption.py",
    "_make_fp8_ckpt.py",
]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_entry_script_has_help(script):
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {script} [options]\n")  # one line; the options follow it once


def test_the_training_help_lists_musubis_no_effect_options_in_one_paragraph():
    """#33: train --help ran to 600 lines: 140 of usage, 45 of options that change nothing here."""
    text = run("kandinsky5_train_network.py", "--help").stdout
    assert len(text.splitlines()) < 450
    assert "--guidance_scale," in text and "no effect here: Kandinsky 5 has no embedded guidance" not in text


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


@pytest.mark.parametrize(
    "script, typo, suggestion",
    [
        ("kandinsky5_train_network.py", "--lerning_rate", "--learning_rate"),
        ("kandinsky5_generate_video.py", "--negative_promt", "--negative_prompt"),
        ("kandinsky5_cache_latents.py", "--skip_exsting", "--skip_existing"),
    ],
)
def test_a_mistyped_option_is_one_short_error_with_did_you_mean(script, typo, suggestion):
    required = ["--dataset_config", "x.toml"] if "cache" in script else []
    result = run(script, typo, "1", *required)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr  # a one-line usage pointing at --help, then the error
    assert lines[-1] == f"{script}: error: unknown option(s): {typo} (did you mean {suggestion}?)"


def test_musubi_tuners_nabla_resize_is_accepted_with_a_note(tiny_tree, tmp_path):
    import kandinsky5_cache_latents

    (tmp_path / "d.toml").write_text(f'[[datasets]]\nimage_directory = "{tmp_path}"\nresolution = 64\n')
    result = subprocess.run(
        [sys.executable, "kandinsky5_cache_latents.py", "--dataset_config", str(tmp_path / "d.toml"), "--task",
         "tiny-t2v", "--vae", str(tiny_tree / "vae"), "--nabla_resize"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "note: --nabla_resize changes nothing here: caching with a NABLA task" in result.stderr
    assert kandinsky5_cache_latents  # the script is importable without side effects


def test_a_qwen_folder_without_its_lm_head_loads_without_transformers_load_report(tiny_tree, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "qwen"
    shutil.copytree(tiny_tree / "text_encoder", folder)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    result = run(
        "kandinsky5_generate_video.py", "--task", "tiny-t2v", "--dit", str(tiny_tree / "model/tiny_t2v.safetensors"),
        "--vae", str(tiny_tree / "vae"), "--text_encoder_qwen", str(folder), "--text_encoder_clip",
        str(tiny_tree / "text_encoder2"), "--prompt", "a cat", "--steps", "1", "--output", str(tmp_path / "o.mp4"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "LOAD REPORT" not in result.stderr + result.stdout and "\x1b[" not in result.stderr + result.stdout


HEAVY_CHECK = """
import contextlib, io, runpy, sys
script = sys.argv[1]
sys.argv = [script, *sys.argv[2:]]
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit:
        pass
print(sorted(m for m in sys.modules
             if m.split(".")[0] in ("transformers", "diffusers", "gradio") or m.startswith("torch.distributed.tensor")))
"""


@pytest.mark.parametrize(
    "script", [*SCRIPTS, "kandinsky5_gui.py", "kandinsky5/lora_tools.py", "kandinsky5/download.py"]
)
@pytest.mark.parametrize("arguments", [["--help"], ["--no_such_option"]], ids=["help", "typo"])
def test_help_and_option_errors_answer_before_the_heavy_libraries_are_imported(script, arguments):
    """transformers, diffusers, gradio and torch.distributed.tensor take seconds to import: --help and a
    mistyped option answer in about the time of importing torch."""
    result = subprocess.run(
        [sys.executable, "-c", HEAVY_CHECK, script, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


PATH_ERRORS = {
    "kandinsky5_generate_video.py": (["--task", "tiny-t2v", "--prompt", "x", "--dit", "absent.safetensors"],
                                     "--dit absent.safetensors"),
    "kandinsky5_train_network.py": (["--task", "tiny-t2v", "--dit", "absent.safetensors", "--dataset_config", "x.toml",
                                     "--output_dir", "out"], "DiT checkpoint absent.safetensors does not exist"),
    "kandinsky5_cache_latents.py": (["--task", "tiny-t2v", "--dataset_config", "absent.toml"],
                                    "dataset config absent.toml does not exist"),
    "kandinsky5_cache_text_encoder_outputs.py": (["--task", "tiny-t2v", "--dataset_config", "absent.toml"],
                                                 "dataset config absent.toml does not exist"),
    "kandinsky5_caption.py": (["--dataset_config", "absent.toml"], "dataset config absent.toml does not exist"),
}  # fmt: skip


@pytest.mark.parametrize("script", sorted(PATH_ERRORS))
def test_path_errors_answer_before_the_heavy_libraries_are_imported(script):
    """#33 item 8: a missing DiT, config or encoder is named in about the time of importing torch."""
    arguments, message = PATH_ERRORS[script]
    checked = subprocess.run(
        [sys.executable, "-c", HEAVY_CHECK, script, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0 and checked.stdout.strip() == "[]", checked.stdout + checked.stderr
    result = run(script, *arguments)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
