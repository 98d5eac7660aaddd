import subprocess
import sys

import av
import pytest

import kandinsky5_train_network
from kandinsky5.inference.media import read_metadata
from kandinsky5.inference.prompt_file import PromptFileError, parse_prompt_line, read_prompt_file

from .training_helpers import ROOT, sampling_args, train_args
from .wandb_records import logged


def frame_count(path) -> tuple[int, int, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for _ in container.decode(video=0)), stream.width, stream.height


def test_samples_during_training_follow_the_prompt_file_and_reach_tensorboard(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --f 5 --s 2\n# a comment\nrain on a window --s 2 --w 32 --h 48 --d 7\n")
    out = tmp_path / "out"
    kandinsky5_train_network.main(
        train_args(
            tiny_tree,
            video_only,
            out,
            "--max_train_steps",
            "4",
            "--sample_every_n_steps",
            "2",
            "--sample_at_first",
            "--logging_dir",
            str(tmp_path / "logs"),
            *sampling_args(tiny_tree, prompts),
        )
    )
    folders = sorted(p.name for p in (out / "sample").iterdir())
    assert folders == ["step00000000", "step00000002", "step00000004"]
    assert sorted(p.name for p in (out / "sample" / "step00000002").iterdir()) == ["000_42.mp4", "001_7.mp4"]
    assert frame_count(out / "sample" / "step00000004" / "000_42.mp4") == (5, 64, 64)
    assert frame_count(out / "sample" / "step00000004" / "001_7.mp4") == (17, 32, 48)
    # samples use the prompts as typed unless --sample_expand_prompt
    assert read_metadata(out / "sample" / "step00000004" / "000_42.mp4")["expanded_prompt"] is None

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [EventAccumulator(str(p.parent)).Reload() for p in (tmp_path / "logs").rglob("events.out.tfevents.*")]
    images = {tag for e in events for tag in e.Tags()["images"]}
    assert {"sample/000", "sample/001"} <= images


def test_every_per_line_option_parses_and_bad_lines_name_their_number(tmp_path):
    line = parse_prompt_line("a cat --w 768 --h 512 --f 33 --d 5 --s 30 --g 4.5 --n blurry, low quality --i a.png", 3)
    assert (line.width, line.height, line.frames, line.seed, line.steps, line.guidance) == (768, 512, 33, 5, 30, 4.5)
    assert (line.negative_prompt, line.image, line.prompt, line.line) == ("blurry, low quality", "a.png", "a cat", 3)
    path = tmp_path / "p.txt"
    path.write_text("fine\n\nbad --q 3\n")
    with pytest.raises(PromptFileError, match=r"p.txt, line 3: unknown option --q"):
        read_prompt_file(path)
    path.write_text("fine --w wide\n")
    with pytest.raises(PromptFileError, match=r"line 1: --w: 'wide' is not an integer"):
        read_prompt_file(path)
    for bad, message in [("--s 0", "--s: '0' is out of range: expected an integer in \\[1, 1000\\]"),
                         ("--g nan", "--g: 'nan' is not finite"), ("--f -3", "--f: '-3' is out of range")]:  # fmt: skip
        path.write_text(f"fine {bad}\n")
        with pytest.raises(PromptFileError, match=f"line 1: {message}"):
            read_prompt_file(path)
    path.write_text("# only a comment\n")
    with pytest.raises(PromptFileError, match="has no prompts"):
        read_prompt_file(path)


def test_validation_loss_is_logged_falls_and_leaves_training_unchanged(tiny_tree, cached_dataset, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    _, _, video_only = cached_dataset
    common = [
        "--max_train_steps",
        "30",
        "--learning_rate",
        "5e-3",
        "--network_dim",
        "8",
        "--timestep_sampling",
        "uniform",
    ]
    kandinsky5_train_network.main(train_args(tiny_tree, video_only, tmp_path / "plain", *common))
    capsys.readouterr()
    kandinsky5_train_network.main(
        train_args(
            tiny_tree,
            video_only,
            tmp_path / "validated",
            *common,
            "--validation_dataset_config",
            str(video_only),
            "--validate_every_n_steps",
            "10",
            "--logging_dir",
            str(tmp_path / "logs"),
        )
    )
    values = [float(line.split()[-1]) for line in capsys.readouterr().out.splitlines() if "validation loss" in line]
    assert len(values) == 3 and values[0] > values[1] > values[2]  # the clip is being memorised
    plain, validated = (load_file(str(tmp_path / n / "lora.safetensors")) for n in ("plain", "validated"))
    assert all(torch.equal(plain[k], validated[k]) for k in plain)  # fixed draws of their own: training unchanged
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_samples_without_encoder_paths_name_the_missing_default_before_the_dit_loads(cached_dataset, tmp_path):
    """The default encoder paths (weights/...) are missing in the working folder: the error names the
    default and the option, and comes before the DiT (given as a missing file) would load."""
    _, _, video_only = cached_dataset
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "kandinsky5_train_network.py"), "--task", "tiny-t2v", "--dit", "absent.safetensors"]
        + ["--dataset_config", str(video_only), "--output_dir", str(tmp_path / "out"), "--sample_prompts", str(prompts)]
        + ["--mixed_precision", "no"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message == (  # every missing path in one message
        "error: --sample_prompts needs the text encoders and the VAE: weights/text_encoder "
        "(the default of --text_encoder_qwen, which was not given) does not exist; weights/text_encoder2 "
        "(the default of --text_encoder_clip, which was not given) does not exist; weights/vae "
        "(the default of --vae, which was not given) does not exist"
    )


def test_samples_leave_training_unchanged(tiny_tree, cached_dataset, tmp_path):
    """Loading the encoders and sampling draw random numbers; training's own stay as they were, so a run
    with samples trains the LoRA of a run without (under FSDP every process samples, under DDP one)."""
    import torch
    from safetensors.torch import load_file

    _, _, video_only = cached_dataset
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --f 5 --s 2\n")
    common = ["--max_train_steps", "3", "--network_dropout", "0.1"]
    kandinsky5_train_network.main(train_args(tiny_tree, video_only, tmp_path / "plain", *common))
    sampled = [*common, "--sample_at_first", "--sample_every_n_steps", "2", *sampling_args(tiny_tree, prompts)]
    kandinsky5_train_network.main(train_args(tiny_tree, video_only, tmp_path / "sampled", *sampled))
    plain, with_samples = (load_file(str(tmp_path / n / "lora.safetensors")) for n in ("plain", "sampled"))
    assert all(torch.equal(plain[k], with_samples[k]) for k in plain)


def test_wandb_and_tensorboard_get_losses_learning_rate_validation_and_samples(
    tiny_tree, cached_dataset, tmp_path, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _, _, video_only = cached_dataset
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --f 5 --s 2\na photo of a cat --f 1 --s 2\n")
    logs = tmp_path / "logs"
    kandinsky5_train_network.main(
        train_args(
            tiny_tree,
            video_only,
            tmp_path / "out",
            "--max_train_steps",
            "2",
            "--log_with",
            "all",
            "--logging_dir",
            str(logs),
            "--wandb_run_name",
            "walk-rank16",
            "--validation_dataset_config",
            str(video_only),
            "--validate_every_n_steps",
            "2",
            "--sample_every_n_steps",
            "2",
            *sampling_args(tiny_tree, prompts),
        )
    )
    runs = list((logs / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # wandb's files under --logging_dir, nowhere else
    name, history = logged(next(runs[0].glob("run-*.wandb")))
    assert name == "walk-rank16" and [step["_step"] for step in history] == ["1", "2"]
    assert {"loss/current", "loss/average", "lr"} <= set(history[0])
    last = history[-1]
    assert float(last["loss/validation"]) > 0
    assert last["sample/000/_type"] == '"video-file"' and last["sample/001/_type"] == '"image-file"'
    assert {p.suffix for p in (runs[0] / "files" / "media").rglob("*.*")} == {".mp4", ".png"}
    assert list(logs.rglob("events.out.tfevents.*"))  # and tensorboard's


def test_log_with_tensorboard_needs_a_folder(tiny_tree, cached_dataset, tmp_path):
    _, _, video_only = cached_dataset
    args = train_args(tiny_tree, video_only, tmp_path, "--log_with", "tensorboard")
    with pytest.raises(SystemExit, match="give them a folder with --logging_dir"):
        kandinsky5_train_network.main(args)
