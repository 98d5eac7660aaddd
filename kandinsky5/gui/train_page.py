"""The Train page: a project folder, its media and captions, the dataset config, both caching steps,
and a training run launched as its own process and watched (loss and learning-rate curves, the
latest samples, steps per second and time left), stopped and resumed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gradio as gr
import pandas as pd

import kandinsky5_cache_latents
import kandinsky5_cache_text_encoder_outputs
import kandinsky5_train_network
from kandinsky5.gui import project as projects
from kandinsky5.gui.presets import VRAM_CHOICES
from kandinsky5.gui.runs import CommandFailed, run_command
from kandinsky5.model.tasks import TASKS


def _project(folder: str) -> projects.Project:
    if not (folder or "").strip():
        raise gr.Error("give the project a folder first")
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".k5_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        what = "is a file" if path.is_file() else (error.strerror or str(error)).lower()
        raise gr.Error(f"project folder {path}: {what}; give a folder you can write to") from None
    return projects.Project(path)


def served_copy(path: Path) -> str:
    """A copy of ``path`` under gradio's own folder (GRADIO_TEMP_DIR or the temp folder), which it always
    serves: a project can be anywhere the user can write, and gradio refuses files outside what it serves."""
    import hashlib
    import tempfile

    root = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio") / "k5_samples"
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:16]
    copy = root / key / path.name
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    return str(copy)


def _summary(printed: str) -> str:
    """A caching script's summary: its counts line and the failed items listed under it."""
    lines = printed.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("cached ")]
    return "\n".join(lines[starts[-1] :]) if starts else ""


def _cache(folder, task, vae, qwen, clip, progress=gr.Progress(track_tqdm=True)) -> str:  # noqa: B008
    project = _project(folder)
    if not project.config.exists():
        raise gr.Error("write the dataset config first")
    common = ["--dataset_config", str(project.config), "--task", task]
    summaries = []
    for what, main, extra in (
        ("latents", kandinsky5_cache_latents.main, ["--vae", vae] if vae else []),
        ("captions", kandinsky5_cache_text_encoder_outputs.main, [*(["--text_encoder_qwen", qwen] if qwen else []),
                                                                  *(["--text_encoder_clip", clip] if clip else [])]),
    ):  # fmt: skip
        try:
            summaries.append(f"{what}: {_summary(run_command(main, [*common, *extra]))}")
        except CommandFailed as failure:  # items that failed are listed; the others are cached
            summaries.append(f"{what}: {_summary(failure.printed) or failure}")
    return "\n".join(summaries)


def _caption_with_qwen(folder, qwen, rows, prefix, replace, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
    """The captions table with Qwen's captions filled in (not saved: they can be edited first)."""
    from kandinsky5.captioning.caption_job import caption_with_qwen, folder_targets
    from kandinsky5.captioning.captioner import CaptionSettings

    project = _project(folder)
    rows = rows.values.tolist() if hasattr(rows, "values") else list(rows or [])
    typed = {str(name): str(caption or "").strip() for name, caption in rows}
    targets = folder_targets(project.media, ".txt") if project.media.is_dir() else []
    if not targets:
        raise gr.Error("add images or videos to the project first")
    for target in targets:  # what the table shows (typed, maybe not saved yet) is what is kept
        target.existing = typed.get(target.path.name) or None
    try:
        summary = caption_with_qwen(targets, qwen or "weights/text_encoder", CaptionSettings(prefix=prefix or ""),
                                    overwrite=bool(replace), save=False)  # fmt: skip
    except (OSError, ValueError) as error:
        raise gr.Error(str(error)) from None
    if summary.failed:
        gr.Warning("; ".join(f"{path.name}: {reason}" for path, reason in summary.failed))
    written = {path.name: caption for path, caption in summary.written}
    return [[t.path.name, written.get(t.path.name, t.existing or "")] for t in targets]


ADAPTERS = {"LoRA": "networks.lora_kandinsky", "LoHa": "networks.loha_kandinsky", "LoKr": "networks.lokr_kandinsky"}


def training_options(
    task, dit, vae, qwen, clip, vram, steps, rate, rank, prompt, every, adapter="LoRA", dora=False
) -> list[str]:
    # absolute paths: typed relative to where the UI runs, read by a process running in the project folder
    dit, vae, qwen, clip = (str(Path(p).resolve()) if (p or "").strip() else "" for p in (dit, vae, qwen, clip))
    options = ["--task", task, "--dit", dit, "--max_train_steps", str(int(steps)), "--learning_rate", str(rate)]
    options += ["--network_dim", str(int(rank)), "--save_every_n_steps", str(int(every)), "--save_state"]
    options += ["--max_data_loader_n_workers", "0", "--vram", vram.split()[0]]  # training picks and prints its options
    if adapter and adapter != "LoRA":
        options += ["--network_module", ADAPTERS[adapter]]
    if dora:
        options += ["--network_args", "dora_wd=True"]
    if (prompt or "").strip():
        options += ["--sample_prompts", "PROMPTS", "--sample_every_n_steps", str(int(every))]
        for option, value in (("--vae", vae), ("--text_encoder_qwen", qwen), ("--text_encoder_clip", clip)):
            if value:
                options += [option, value]
    return options


def _start(folder, *values) -> str:
    *values, processes, adapter, dora = values
    processes = max(1, int(processes or 1))
    project = _project(folder)
    if not project.config.exists():
        raise gr.Error("write the dataset config first")
    options = training_options(*values, adapter, dora)
    if "PROMPTS" in options:
        prompts = project.sample_prompts_file
        prompts.write_text(values[-2].strip() + "\n", encoding="utf-8")
        options[options.index("PROMPTS")] = str(prompts)
    try:  # training's own checks and messages (paths, caches, options), before a process starts for nothing
        run_command(kandinsky5_train_network.check, projects.training_arguments(project, options))
    except CommandFailed as failure:
        raise gr.Error(str(failure)) from None
    try:
        pid = projects.start_training(project, options, processes=processes)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    return f"training started (process {pid}); it goes on if this page closes"


def status(folder):
    """(loss curve, learning-rate curve, latest samples, progress text, finished LoRAs)."""
    if not (folder or "").strip():
        return None, None, [], "", []
    project = projects.Project(Path(folder))
    lines = projects.curves(project)
    loss = pd.DataFrame(lines.get("loss/current", []), columns=["step", "loss"])
    rate = pd.DataFrame(lines.get("lr", []), columns=["step", "learning rate"])
    done = projects.progress(project)
    state = "running" if projects.running(project) else "not running"
    text = f"**{state}**"
    if done:
        text += (
            f" — step {done['step']} of {done['total']}, {done['steps_per_second']:.2f} steps/s, "
            f"{done['time_left']} left"
        )
    prompts = projects.sample_prompts(project)
    samples = [  # <prompt number>_<seed>.mp4 / .png, shown with its prompt
        (served_copy(p), prompts.get(p.stem.split("_")[0], p.name))
        for p in projects.latest_samples(project)
        if p.suffix in (".png", ".mp4")
    ]
    return loss, rate, samples, text, [str(p) for p in projects.finished_loras(project)]


def build(defaults: dict, lora_target=None) -> None:
    """``lora_target``: the Generate page's LoRA box, which "Use in Generate" fills."""
    folder = gr.Textbox(label="Project folder", value=defaults.get("project", "projects/my_lora"))
    with gr.Row():
        with gr.Column():
            gr.Markdown("**1. Media and captions**")
            uploads = gr.File(
                label="Images or videos (and <name>.txt captions)", file_count="multiple", type="filepath"
            )
            add = gr.Button("Add to the project")
            table = gr.Dataframe(
                headers=["file", "caption"], datatype=["str", "str"], label="Captions", interactive=True
            )
            with gr.Row():
                prefix = gr.Textbox(label="Caption prefix (a trigger word)", value="")
                replace = gr.Checkbox(label="Replace the captions already written", value=False)
            with gr.Row():
                write_captions = gr.Button("Caption with Qwen")
                save = gr.Button("Save captions")
            gr.Markdown("**2. Dataset config**")
            with gr.Row():
                kind = gr.Radio(["image", "video"], value="video", label="Kind")
                resolution = gr.Number(label="Resolution", value=defaults.get("resolution", 512), precision=0)
                frames = gr.Number(label="Frames per clip", value=defaults.get("frames", 17), precision=0)
            write = gr.Button("Write the dataset config")
            config_text = gr.Code(label="dataset.toml", language=None)
            gr.Markdown("**3. Caching**")
            cache = gr.Button("Cache latents and captions")
            cache_report = gr.Textbox(label="Caching summary", lines=3)
        with gr.Column():
            gr.Markdown("**4. Training**")
            task = gr.Dropdown(list(TASKS), value=defaults.get("task", "k5-lite-t2v-5s-sd"), label="Task")
            dit = gr.Textbox(label="DiT", value=defaults.get("dit", ""))
            vae = gr.Textbox(label="VAE (for caching and samples)", value=defaults.get("vae", ""))
            qwen = gr.Textbox(label="Qwen2.5-VL", value=defaults.get("text_encoder_qwen", ""))
            clip = gr.Textbox(label="CLIP-L", value=defaults.get("text_encoder_clip", ""))
            vram = gr.Dropdown(VRAM_CHOICES, value="24 GB", label="GPU memory preset")
            with gr.Row():
                steps = gr.Number(label="Steps", value=defaults.get("train_steps", 1600), precision=0)
                rate = gr.Number(label="Learning rate", value=1e-4)
                rank = gr.Number(label="Rank", value=16, precision=0)
            with gr.Row():
                adapter = gr.Dropdown(list(ADAPTERS), value="LoRA", label="Adapter (docs/training.md: LoHa, LoKr)")
                dora = gr.Checkbox(label="DoRA (weight-decomposed)", value=False)
            processes = gr.Number(
                label="GPUs (more than 1: accelerate launch --multi_gpu, one process each)", value=1, precision=0
            )
            prompt = gr.Textbox(
                label="Sample prompt (empty: no samples)",
                value=defaults.get("sample_prompt", ""),
                info="a prompt-file line: the prompt, then options such as --f frames, --s steps, --w/--h size, "
                "--d seed, --g guidance (docs/inference.md)",
            )
            every = gr.Number(label="Save (and sample) every N steps", value=defaults.get("every", 250), precision=0)
            with gr.Row():
                start = gr.Button("Start", variant="primary")
                stop = gr.Button("Stop (saves a state)")
                resume = gr.Button("Resume")
            message = gr.Markdown()
            progress_text = gr.Markdown()
            loss_plot = gr.LinePlot(x="step", y="loss", title="Loss")
            rate_plot = gr.LinePlot(x="step", y="learning rate", title="Learning rate")
            samples = gr.Gallery(label="Latest samples", columns=4, height=280)
            loras = gr.Dropdown([], label="Finished LoRAs", allow_custom_value=True)
            use = gr.Button("Use in Generate")

    def do_add(folder_value, files):
        project = _project(folder_value)
        try:
            projects.add_media(project, files or [])
        except (ValueError, OSError) as error:
            raise gr.Error(str(error)) from None
        return projects.caption_rows(project)

    def do_save(folder_value, rows):
        rows = rows.values.tolist() if hasattr(rows, "values") else rows
        try:
            return f"{projects.save_captions(_project(folder_value), rows)} captions saved"
        except (ValueError, OSError) as error:
            raise gr.Error(str(error)) from None

    add.click(do_add, [folder, uploads], table, api_name="add_media")
    write_captions.click(
        _caption_with_qwen, [folder, qwen, table, prefix, replace], table, api_name="caption_with_qwen"
    )
    save.click(do_save, [folder, table], message, api_name="save_captions")
    write.click(
        lambda f, k, r, n: projects.write_dataset_config(_project(f), k, r, n),
        [folder, kind, resolution, frames],
        config_text,
        api_name="write_config",
    )
    cache.click(_cache, [folder, task, vae, qwen, clip], cache_report, api_name="cache")
    run_inputs = [folder, task, dit, vae, qwen, clip, vram, steps, rate, rank, prompt, every, processes, adapter, dora]
    start.click(_start, run_inputs, message, api_name="start_training")
    stop.click(
        lambda f: (
            "stopping after this step; a state is saved" if projects.stop_training(_project(f)) else "not running"
        ),
        folder,
        message,
        api_name="stop_training",
    )

    def do_resume(folder_value):
        project = _project(folder_value)
        try:
            run = projects.resume_plan(project)
            # training's own checks of the state and options, before a process starts for nothing
            run_command(kandinsky5_train_network.check, projects.training_arguments(project, *run[:2]))
            return f"resumed (process {projects.start_training(project, *run)})"
        except CommandFailed as failure:
            raise gr.Error(str(failure)) from None
        except ValueError as error:
            raise gr.Error(str(error)) from None

    resume.click(do_resume, folder, message, api_name="resume_training")
    outputs = [loss_plot, rate_plot, samples, progress_text, loras]

    def refresh(folder_value):
        loss, rate_frame, sample_files, text, finished = status(folder_value)
        return (
            loss,
            rate_frame,
            sample_files,
            text,
            gr.Dropdown(choices=finished, value=finished[-1] if finished else None),
        )

    gr.Timer(2.0).tick(refresh, folder, outputs)
    folder.change(lambda f: projects.caption_rows(_project(f)) if (f or "").strip() else [], folder, table)
    gr.Button("Refresh", size="sm").click(refresh, folder, outputs, api_name="status")
    if lora_target is not None:
        use.click(lambda path: f"{path}:1.0" if path else "", loras, lora_target)
