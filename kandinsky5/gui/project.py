"""A training project folder, as the Train page keeps it, and the steps the page runs on it.

    <project>/media/          the images or videos, each with <name>.txt as its caption
    <project>/dataset.toml    the dataset config (written from the page)
    <project>/cache/          latent and text caches
    <project>/output/         LoRA files, states, samples (output/sample/step.../)
    <project>/logs/           tensorboard logs: the loss and learning-rate curves
    <project>/train.log       what the training process prints; <project>/train.pid its process id and
                              start time (a pid reused by another process since does not match)
    <project>/train.json      the run's options and process count, for Resume

Caching runs the caching scripts' entry points; training runs as a process of its own session
(python kandinsky5_train_network.py, or accelerate launch for several GPUs), so closing the browser
or stopping the UI does not stop it, and Stop sends it SIGINT: it saves a state to resume from and
exits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from modules.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".webm", ".gif"}
PROGRESS = re.compile(r"training:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \[([^<\]]*)<([^,\]]*),\s*([\d.]+)(s/step|step/s)")


@dataclass(frozen=True)
class Project:
    folder: Path

    def __post_init__(self):  # absolute: the training process runs in the project folder, not the UI's
        object.__setattr__(self, "folder", Path(self.folder).resolve())

    @property
    def media(self) -> Path:
        return self.folder / "media"

    @property
    def config(self) -> Path:
        return self.folder / "dataset.toml"

    @property
    def output(self) -> Path:
        return self.folder / "output"

    @property
    def logs(self) -> Path:
        return self.folder / "logs"

    @property
    def log_file(self) -> Path:
        return self.folder / "train.log"

    @property
    def pid_file(self) -> Path:
        return self.folder / "train.pid"

    @property
    def run_file(self) -> Path:
        return self.folder / "train.json"

    @property
    def sample_prompts_file(self) -> Path:
        return self.folder / "sample_prompts.txt"


def add_media(project: Project, files: list[str]) -> list[str]:
    """Copy images / videos into the project, and captions given as <name>.txt files with them;
    returns the names of the media."""
    project.media.mkdir(parents=True, exist_ok=True)
    known = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS | {".txt"}
    for name in files:  # all checked before any is copied
        if Path(name).suffix.lower() not in known:
            raise ValueError(f"{Path(name).name}: not an image, video or caption ({', '.join(sorted(known))})")
    for name in files:
        shutil.copyfile(name, project.media / Path(name).name)
    return [Path(name).name for name in files if Path(name).suffix.lower() != ".txt"]


def caption_rows(project: Project) -> list[list[str]]:
    """[file, caption] for each medium of the project (an empty caption where none was written)."""
    rows = []
    for path in sorted(project.media.glob("*")) if project.media.is_dir() else []:
        if path.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
            caption = path.with_suffix(".txt")
            rows.append([path.name, caption.read_text(encoding="utf-8").strip() if caption.exists() else ""])
    return rows


MAX_NAME_BYTES = 255  # a file name's limit on common file systems


def caption_file(project: Project, name) -> Path:
    """Where the caption of the project's medium ``name`` goes; a name that is not one of its media (empty,
    a path, a NUL, too long, unknown) is a ValueError naming it."""
    name = "" if name is None else str(name)
    shown = repr(name if len(name) <= 60 else name[:60] + "...")
    if not name.strip() or "\0" in name or "/" in name or "\\" in name or name in (".", ".."):
        raise ValueError(f"caption row {shown}: the file column must hold the name of one of the project's media")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"caption row {shown}: the name is longer than {MAX_NAME_BYTES} bytes")
    if not (project.media / name).is_file() or Path(name).suffix.lower() not in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
        raise ValueError(f"caption row {shown}: there is no such image or video in {project.media}")
    return project.media / Path(name).with_suffix(".txt").name


def save_captions(project: Project, rows: list[list[str]]) -> int:
    """Write each row's caption beside its medium; every row is checked before anything is written."""
    files = [(caption_file(project, name), caption) for name, caption in rows]
    for path, caption in files:
        path.write_text(str(caption).strip() + "\n", encoding="utf-8")
    return len(files)


def write_dataset_config(project: Project, kind: str, resolution: int, frames: int) -> str:
    """The dataset config for the project's media (``kind``: image or video); returns its text."""
    directory = "image_directory" if kind == "image" else "video_directory"
    lines = [
        "[general]",
        f"resolution = {int(resolution)}",
        'caption_extension = ".txt"',
        "enable_bucket = true",
        "",
        "[[datasets]]",
        f'{directory} = "{project.media.as_posix()}"',
        f'cache_directory = "{(project.folder / "cache").as_posix()}"',
    ]
    if kind == "video":
        lines.append(f"target_frames = [{int(frames)}]")
    text = "\n".join(lines) + "\n"
    project.config.write_text(text, encoding="utf-8")
    return text


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from Linux's /proc); None when there is none."""
    try:  # the name, in parentheses, may hold spaces: the start time is the 20th field after it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def training_pid(project: Project) -> int | None:
    """The pid of this project's training process, if it is still that process. The pid file holds the pid
    and the process's start time: a pid the system gave to another process since (the run ended while no
    page was open) does not match, and the stale file is cleared."""
    if not project.pid_file.exists():
        return None
    try:
        pid, started = project.pid_file.read_text().split()
        pid = int(pid)
    except ValueError:  # a file of an older UI (the pid alone): its process cannot be told from another
        pid, started = None, None
    if pid is not None:
        try:  # a run this UI started and that has ended is reaped here (else it would linger as a zombie)
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                pid = None
        except ChildProcessError:
            pass  # started by an earlier UI: only the system can tell
    if pid is None or _start_time(pid) != started:
        project.pid_file.unlink(missing_ok=True)
        return None
    return pid


def running(project: Project) -> bool:
    return training_pid(project) is not None


def training_arguments(project: Project, options: list[str], resume: Path | None = None) -> list[str]:
    """The training script's command-line options for a run of this project."""
    arguments = ["--dataset_config", str(project.config), "--output_dir", str(project.output)]
    arguments += ["--logging_dir", str(project.logs), *options]
    return arguments + (["--resume", str(resume)] if resume else [])


def training_command(project: Project, options: list[str], resume: Path | None = None, processes: int = 1) -> list[str]:
    """One process, or ``accelerate launch --multi_gpu`` with one process per GPU (on a port of its own:
    another run on this machine may hold the default one)."""
    script = str(ROOT / "kandinsky5_train_network.py")
    if processes > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
        launcher += ["--num_processes", str(processes), "--main_process_port", str(free_port())]
        launcher += ["--dynamo_backend", "no", script]
    else:
        launcher = [sys.executable, script]
    return launcher + training_arguments(project, options, resume)


def start_training(project: Project, options: list[str], resume: Path | None = None, processes: int = 1) -> int:
    """Launch training as a process of its own session (it outlives the UI); returns its pid. The
    options and process count are kept in train.json for Resume."""
    if running(project):
        raise ValueError(f"a training run of {project.folder} is already running")
    log = open(project.log_file, "a", encoding="utf-8")  # noqa: SIM115 (the child keeps it)
    process = subprocess.Popen(
        training_command(project, options, resume, processes),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=project.folder,
        start_new_session=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1"),
    )
    written = project.pid_file.with_name(f".{project.pid_file.name}.tmp")
    written.write_text(f"{process.pid} {_start_time(process.pid)}")
    written.replace(project.pid_file)  # whole or not at all: the status page reads it every 2 s
    project.run_file.write_text(json.dumps({"options": options, "processes": processes}, indent=1), encoding="utf-8")
    return process.pid


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # the name, in parentheses, may hold spaces: the parent id is the second field after it
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def stop_training(project: Project) -> bool:
    """Ask the run to stop: it saves a state at the end of its current step and exits. Under
    accelerate launch the training processes are asked, not the launcher, which would give them only
    a short time before killing them."""
    pid = training_pid(project)
    if pid is None:
        return False
    several = json.loads(project.run_file.read_text(encoding="utf-8")).get("processes", 1) > 1
    for target in (_children(pid) if several else []) or [pid]:
        os.kill(target, signal.SIGINT)
    return True


def latest_state(project: Project) -> Path | None:
    states = [p for p in project.output.glob("*-state") if p.is_dir()] if project.output.is_dir() else []
    return max(states, key=lambda p: p.stat().st_mtime) if states else None


def resume_plan(project: Project) -> tuple[list[str], Path, int]:
    """(the run's options, the newest state, the process count) to resume the project's run with."""
    state = latest_state(project)
    if state is None:
        raise ValueError(f"no saved state in {project.output} to resume from (Stop saves one)")
    if not project.run_file.exists():
        raise ValueError(f"{project.run_file} is missing: start the run again from the page")
    run = json.loads(project.run_file.read_text(encoding="utf-8"))
    return run["options"], state, run["processes"]


def progress(project: Project) -> dict:
    """Step, total, steps per second and time left from the run's progress bar in train.log."""
    if not project.log_file.exists():
        return {}
    text = project.log_file.read_text(encoding="utf-8", errors="replace")
    found = PROGRESS.findall(text.replace("\r", "\n"))
    if not found:
        return {}
    step, total, elapsed, left, rate, unit = found[-1]
    per_second = float(rate) if unit == "step/s" else 1.0 / max(float(rate), 1e-9)
    return {"step": int(step), "total": int(total), "steps_per_second": per_second, "time_left": left.strip()}


def curves(project: Project) -> dict[str, list[tuple[int, float]]]:
    """The logged scalars (loss/current, loss/average, lr, loss/validation) as (step, value) lists."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, list[tuple[int, float]]] = {}
    for events in project.logs.rglob("events.out.tfevents.*") if project.logs.is_dir() else []:
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0}).Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(set(points)) for tag, points in values.items()}


def sample_prompts(project: Project) -> dict[str, str]:
    """The run's sample prompts by the number that starts their files' names ("000" of 000_42.mp4),
    read as training reads them."""
    from kandinsky5.inference.prompt_file import PromptFileError, read_prompt_file

    try:
        lines = read_prompt_file(project.sample_prompts_file)
        return {f"{index:03d}": line.prompt for index, line in enumerate(lines)}
    except PromptFileError:  # none written yet
        return {}


def latest_samples(project: Project) -> list[Path]:
    folders = sorted((project.output / "sample").glob("step*")) if (project.output / "sample").is_dir() else []
    return sorted(folders[-1].iterdir()) if folders else []


def finished_loras(project: Project) -> list[Path]:
    return sorted(project.output.glob("*.safetensors")) if project.output.is_dir() else []
