"""The presets of published checkpoints beyond the spec's list: the distilled Pro I2V's conditioning in
generation and training, checkpoints in the diffusers layout, and the downloader's entries for them."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dataset.config import load_dataset_config
from dataset.training_data import find_samples, load_batch
from kandinsky5.download import DIFFUSERS_DIT_REPOS, DIT_REPOS, ORGANIZATION, plan
from kandinsky5.model.checkpoint import load_dit
from kandinsky5.model.dit import DiffusionTransformer3D
from kandinsky5.model.tasks import OFFICIAL_TASKS, get_task
from kandinsky5.training.train import training_loss

from .dit_helpers import diffusers_dit
from .generation_helpers import generate
from .test_download import cache_repo, download, listing
from .test_mixed_precision import training_args


@pytest.fixture
def dit_inputs():
    """Every DiT input ``x`` of the code run in the test, seen through a global forward pre-hook."""
    seen = []

    def record(module, args):
        if isinstance(module, DiffusionTransformer3D):
            seen.append(args[0].detach().clone())

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record)
    yield seen
    handle.remove()


def first_frame_latent(tiny_tree, image_path, width, height, seed):
    from kandinsky5.encoders.vae import load_vae
    from kandinsky5.inference.media import image_to_pixels, load_image, resize_and_crop

    vae = load_vae(tiny_tree / "vae", "hunyuan", device="cpu", dtype=torch.float32)
    pixels = image_to_pixels(resize_and_crop(load_image(image_path), width, height))
    return vae.encode(pixels, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("task", ["tiny-i2v", "tiny-i2v-distil"])
def test_generation_puts_the_first_frame_in_the_conditioning_only_for_the_distilled_i2v(
    tiny_tree, tmp_path, dit_inputs, task
):
    Image.new("RGB", (64, 64), (200, 40, 90)).save(tmp_path / "first.png")
    generate(tiny_tree, task, "--image", str(tmp_path / "first.png"), "--prompt", "waves", "--frames", "9",
             "--steps", "2", "--no_expand_prompt", "--output", str(tmp_path / "clip.mp4"))  # fmt: skip
    latent = first_frame_latent(tiny_tree, tmp_path / "first.png", 64, 64, seed=42)
    assert dit_inputs
    for x in dit_inputs:  # (a batch of 2 with guidance: the conditional and unconditional passes)
        latent = latent.to(x.dtype).expand(x.shape[0], -1, -1, -1, -1)
        assert torch.equal(x[:, :1, ..., :16], latent)  # the first frame, in both conventions
        assert (x[:, 0, ..., 32] == 1).all() and (x[:, 1:, ..., 16:] == 0).all()
        conditioning = x[:, :1, ..., 16:32]
        if task == "tiny-i2v-distil":
            assert torch.equal(conditioning, latent)
        else:
            assert (conditioning == 0).all()  # the official convention


def test_training_gives_the_distilled_i2v_the_conditioning_generation_gives(tiny_tree, cached_dataset, dit_inputs):
    _, _, video_only = cached_dataset
    task = get_task("tiny-i2v-distil")
    dit = load_dit(tiny_tree / "model/tiny_t2v.safetensors", task, dtype=torch.float32)
    (entry,) = [find_samples(d) for d in load_dataset_config(video_only)]
    batch = load_batch(entry.samples)
    training_loss(dit, batch, task, training_args(), "cpu")
    (x,) = dit_inputs
    first = batch["first_frame"].to(x.dtype)
    assert torch.equal(x[:, :1, ..., :16], first) and torch.equal(x[:, :1, ..., 16:32], first)
    assert (x[:, 0, ..., 32] == 1).all() and (x[:, 1:, ..., 16:] == 0).all()


def diffusers_folder(tiny_tree, folder):
    """The tiny DiT as a diffusers repository's transformer/ folder holds it: config.json and sharded
    weights with their index (diffusers' names are the official ones)."""
    model = diffusers_dit("tiny-i2v", load_file(str(tiny_tree / "model/tiny_t2v.safetensors")))
    model.save_pretrained(folder, max_shard_size="100KB")
    return folder


def test_a_diffusers_layout_folder_loads_as_it_is_and_gives_the_same_model(tiny_tree, tmp_path):
    folder = diffusers_folder(tiny_tree, tmp_path / "transformer")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    task = get_task("tiny-i2v-distil")
    ours = load_dit(tiny_tree / "model/tiny_t2v.safetensors", task, dtype=torch.float32)
    theirs = load_dit(folder, task, dtype=torch.float32)
    for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_every_published_preset_has_a_download_entry(tmp_path):
    for name in OFFICIAL_TASKS:
        dit = plan(get_task(name), tmp_path)[0]
        assert dit.repo.startswith(f"{ORGANIZATION}/Kandinsky-5.0-")
    assert plan(get_task("k5-lite-t2v-10s-nocfg-sd"), tmp_path)[0].repo.endswith("T2V-Lite-nocfg-10s")
    assert {get_task(n).checkpoint for n in OFFICIAL_TASKS if get_task(n).diffusers_layout} == set(DIFFUSERS_DIT_REPOS)
    assert "kandinsky5pro_t2v_pretrain_5s" in DIT_REPOS and "kandinsky5pro_t2v_pretrain_10s" in DIT_REPOS


def test_the_downloader_places_a_diffusers_layout_dit_folder(tiny_tree, tmp_path):
    cache = tmp_path / "hub"
    folder = diffusers_folder(tiny_tree, tmp_path / "made")
    files = {f"transformer/{p.name}": p.read_bytes() for p in folder.iterdir()}
    files["vae/config.json"] = b"{}"  # the rest of that repository is not taken
    cache_repo(cache, "kandinskylab/Kandinsky-5.0-I2V-Pro-distilled-5s-Diffusers", files)
    weights = tmp_path / "weights"
    for name, data in {"vae/config.json": b"{}", "vae/diffusion_pytorch_model.safetensors": b"vae"}.items():
        (weights / name).parent.mkdir(parents=True, exist_ok=True)
        (weights / name).write_bytes(data)
    shutil.copytree(tiny_tree / "text_encoder", weights / "text_encoder")
    index = {"weight_map": {"w": "model.safetensors"}}
    (weights / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    (weights / "text_encoder2").mkdir()
    (weights / "text_encoder2" / "clip_l.safetensors").write_bytes(b"clip")
    result = download(weights, "k5-pro-i2v-5s-distil-sd", cache)
    assert result.returncode == 0, result.stderr[-3000:]
    placed = [p for p in listing(weights) if p.startswith("model/")]
    assert placed == sorted(f"model/kandinsky5pro_i2v_distilled_5s/{p.name}" for p in folder.iterdir())
    again = download(weights, "k5-pro-i2v-5s-distil-sd", tmp_path / "empty_hub")
    assert again.returncode == 0 and "DiT: present" in again.stdout, again.stderr[-2000:]


def sparse_checkpoint(path, shapes: dict, prefix: str = ""):
    """A safetensors file of the real size whose data is a hole (nothing written to disk): its header, which
    is what the architecture check reads, is that of a published bf16 checkpoint with these shapes."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[prefix + key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    data = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(data).to_bytes(8, "little") + data)
        f.truncate(8 + len(data) + offset)
    return path


NEW_PRESETS = ["k5-pro-t2v-5s-pretrain-sd", "k5-pro-t2v-10s-pretrain-sd", "k5-pro-t2v-5s-distil-sd",
               "k5-pro-i2v-5s-distil-sd", "k5-lite-t2i-pretrain-hd", "k5-lite-i2i-pretrain-hd"]  # fmt: skip


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_each_new_preset_takes_a_checkpoint_of_its_published_layout_and_size(name, tmp_path):
    """Real-size headers (sparse files): the official single file, or the diffusers transformer/ folder
    with its shard index, fit the preset's architecture."""
    from kandinsky5.model.checkpoint import check_architecture, checkpoint_files, expected_shapes, read_layout

    task = get_task(name)
    shapes = expected_shapes(task.dit_params)
    if task.diffusers_layout:
        folder = tmp_path / task.checkpoint
        folder.mkdir()
        keys = sorted(shapes)
        halves = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                  "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}  # fmt: skip
        for file, part in halves.items():
            sparse_checkpoint(folder / file, {k: shapes[k] for k in part})
        index = {"weight_map": {k: file for file, part in halves.items() for k in part}}
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
        (folder / "config.json").write_text("{}")
        path = folder
    else:
        path = sparse_checkpoint(tmp_path / task.checkpoint, shapes)
    check_architecture(read_layout(checkpoint_files(path)), task, str(path))
    with pytest.raises(ValueError, match=f"fits these tasks: .*{name}"):  # and another task names it
        check_architecture(read_layout(checkpoint_files(path)), get_task("k5-lite-t2v-5s-sd"), str(path))
