import subprocess
import sys
from pathlib import Path

import torch

from kandinsky5.model.checkpoint import load_dit
from kandinsky5.model.tasks import TASKS
from kandinsky5.tiny import build_tiny_tree

EXPECTED = [
    "model/tiny_t2v.safetensors",
    "model/tiny_pro_t2v.safetensors",
    "model/tiny_t2i.safetensors",
    "model/tiny_i2i.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "flux/vae/config.json",
    "flux/vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/tokenizer.json",
    "text_encoder/preprocessor_config.json",
    "text_encoder2/clip_l.safetensors",
]


def test_layout_and_every_tiny_task_loads_its_dit(tiny_tree):
    for relative in EXPECTED:
        assert (tiny_tree / relative).is_file(), relative
    for task in (t for t in TASKS.values() if t.name.startswith("tiny-")):
        model = load_dit(tiny_tree / "model" / task.checkpoint, task)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_the_tree_is_deterministic_from_its_seed(tiny_tree, tmp_path):
    again = build_tiny_tree(tmp_path / "again", seed=0)
    other = build_tiny_tree(tmp_path / "other", seed=1)
    for relative in EXPECTED:
        if relative.endswith(".safetensors") or relative.endswith("tokenizer.json"):
            assert (again / relative).read_bytes() == (tiny_tree / relative).read_bytes(), relative
    a = load_dit(tiny_tree / "model/tiny_t2v.safetensors", TASKS["tiny-t2v"]).state_dict()
    b = load_dit(other / "model/tiny_t2v.safetensors", TASKS["tiny-t2v"]).state_dict()
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_builder_command(tmp_path):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "kandinsky5.tiny", str(tmp_path / "w")],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote 17 files" in result.stdout
