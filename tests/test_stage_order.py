"""Generation's stages never share the device: the text encoders are gone before the DiT loads, and
the DiT is gone before the VAE decodes (an I2V run's VAE waits in CPU memory while the DiT samples).
What is alive is recorded at each stage by spies that call the real loaders and decoder."""

from __future__ import annotations

import gc

import pytest

import kandinsky5.inference.generate as generation
from kandinsky5.encoders.text_encoders import ClipEncoder, QwenEncoder
from kandinsky5.encoders.vae import VAE
from kandinsky5.model.dit import DiffusionTransformer3D

from .generation_helpers import generate
from .media_factory import write_image


def alive(kind: type) -> list:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, kind)]


def devices(models) -> set[str]:
    return {str(p.device) for m in models for p in (m.model if isinstance(m, VAE) else m).parameters()}


@pytest.mark.parametrize("task", ["tiny-t2v", "tiny-i2v"])
def test_text_encoders_leave_before_the_dit_and_the_dit_before_the_vae_decodes(tiny_tree, tmp_path, monkeypatch, task):
    stages = []
    load_dit, decode = generation.load_dit, VAE.decode

    def loading_dit(*args, **kwargs):
        stages.append(("DiT loads", alive(QwenEncoder) + alive(ClipEncoder), devices(alive(VAE))))
        return load_dit(*args, **kwargs)

    def decoding(self, latent):
        stages.append(("VAE decodes", alive(QwenEncoder) + alive(ClipEncoder) + alive(DiffusionTransformer3D), None))
        return decode(self, latent)

    monkeypatch.setattr(generation, "load_dit", loading_dit)
    monkeypatch.setattr(VAE, "decode", decoding)
    image = ["--image", str(write_image(tmp_path / "first.png", 64, 64, seed=3))] if task == "tiny-i2v" else []
    generate(tiny_tree, task, "--prompt", "a fox", "--steps", "2", "--output", str(tmp_path / "out.mp4"), *image)
    assert [stage for stage, _, _ in stages] == ["DiT loads", "VAE decodes"]
    (_, encoders, vae_devices), (_, left_at_decoding, _) = stages
    assert encoders == []  # Qwen and CLIP were freed before the DiT loaded
    assert vae_devices <= {"cpu"}  # I2V: the VAE that encoded the first frame waits in CPU memory
    assert left_at_decoding == []  # nor encoders nor the DiT are alive while the VAE decodes
