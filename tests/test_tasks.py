import pytest
import torch
from diffusers import Kandinsky5Transformer3DModel

from kandinsky5.model.dit import DiffusionTransformer3D
from kandinsky5.model.tasks import OFFICIAL_TASKS, TASKS, UnknownTaskError, get_task

SPEC_TASKS = """
k5-lite-t2i-hd k5-lite-i2i-hd k5-lite-t2v-5s-sd k5-lite-t2v-10s-sd k5-lite-i2v-5s-sd k5-lite-t2v-5s-distil-sd
k5-lite-t2v-10s-distil-sd k5-lite-t2v-5s-nocfg-sd k5-lite-t2v-10s-nocfg-sd k5-lite-t2v-5s-pretrain-sd
k5-lite-t2v-10s-pretrain-sd k5-pro-t2v-5s-sd k5-pro-t2v-5s-hd k5-pro-t2v-10s-sd k5-pro-t2v-10s-hd k5-pro-i2v-5s-sd
k5-pro-i2v-5s-hd
""".split()
# Published checkpoints beyond the spec's list (issue #32): Pro pretrain, Pro distilled (diffusers layout only),
# Image Lite pretrain (diffusers layout).
PUBLISHED_TASKS = """
k5-pro-t2v-5s-pretrain-sd k5-pro-t2v-10s-pretrain-sd k5-pro-t2v-5s-distil-sd k5-pro-i2v-5s-distil-sd
k5-lite-t2i-pretrain-hd k5-lite-i2i-pretrain-hd
""".split()

# Parameter counts of the published models (official class instantiated on meta).
LITE_VIDEO, PRO_VIDEO, LITE_IMAGE = 2_007_702_848, 19_311_325_248, 6_022_080_576
# I2I adds the 17 conditioning channels x 2x2 patch to the visual input layer: (132 - 64) * 2560.
LITE_IMAGE_EDIT = LITE_IMAGE + 68 * 2560


def count_on_meta(task_name: str) -> int:
    with torch.device("meta"):
        model = DiffusionTransformer3D(**get_task(task_name).dit_params)
    return sum(p.numel() for p in model.parameters())


def test_the_seventeen_spec_tasks_and_the_other_published_checkpoints_exist():
    assert sorted(OFFICIAL_TASKS) == sorted(SPEC_TASKS + PUBLISHED_TASKS)
    assert len(SPEC_TASKS) == 17


@pytest.mark.parametrize("name", SPEC_TASKS + PUBLISHED_TASKS)
def test_every_official_task_instantiates_with_the_published_parameter_count(name):
    expected = {"t2v": None, "i2v": None, "t2i": LITE_IMAGE, "i2i": LITE_IMAGE_EDIT}[get_task(name).kind]
    if expected is None:
        expected = PRO_VIDEO if "-pro-" in name else LITE_VIDEO
    assert count_on_meta(name) == expected


def test_image_edit_count_agrees_with_diffusers_conditioned_model():
    params = dict(get_task("k5-lite-i2i-hd").dit_params)
    params.pop("instruct_type")
    with torch.device("meta"):
        theirs = Kandinsky5Transformer3DModel(**{**params, "visual_cond": True})
    assert sum(p.numel() for p in theirs.parameters()) == LITE_IMAGE_EDIT


# name: (steps, guidance, scheduler_scale, rope_scale, resolution, nabla P, vae, qwen length, frames, checkpoint)
REFERENCE = {
    "k5-lite-t2v-5s-sd": (50, 5.0, 10, (1, 2, 2), 512, None, "hunyuan", 256, 121, "kandinsky5lite_t2v_sft_5s"),
    "k5-lite-t2v-10s-sd": (50, 5.0, 10, (1, 2, 2), 512, 0.9, "hunyuan", 256, 241, "kandinsky5lite_t2v_sft_10s"),
    "k5-lite-t2v-5s-distil-sd": (
        16,
        1.0,
        5,
        (1, 2, 2),
        512,
        None,
        "hunyuan",
        256,
        121,
        "kandinsky5lite_t2v_distilled16steps_5s",
    ),
    "k5-lite-t2v-10s-distil-sd": (
        16,
        1.0,
        10,
        (1, 2, 2),
        512,
        0.9,
        "hunyuan",
        256,
        241,
        "kandinsky5lite_t2v_distilled16steps_10s",
    ),
    # (the official config names the SFT file; the CFG-distilled 10 s file is published as nocfg_10s)
    "k5-lite-t2v-10s-nocfg-sd": (50, 1.0, 10, (1, 2, 2), 512, 0.9, "hunyuan", 256, 241, "kandinsky5lite_t2v_nocfg_10s"),
    "k5-pro-t2v-5s-pretrain-sd": (
        50,
        5.0,
        10,
        (1, 2, 2),
        512,
        None,
        "hunyuan",
        256,
        121,
        "kandinsky5pro_t2v_pretrain_5s",
    ),
    "k5-pro-t2v-10s-pretrain-sd": (
        50,
        5.0,
        10,
        (1, 2, 2),
        512,
        0.9,
        "hunyuan",
        256,
        241,
        "kandinsky5pro_t2v_pretrain_10s",
    ),  # fmt: skip
    "k5-lite-i2v-5s-sd": (50, 5.0, 10, (1, 2, 2), 512, None, "hunyuan", 256, 121, "kandinsky5lite_i2v_5s"),
    "k5-pro-t2v-5s-hd": (50, 5.0, 10, (1, 3.16, 3.16), 1024, 0.8, "hunyuan", 256, 121, "kandinsky5pro_t2v_sft_5s"),
    "k5-pro-t2v-10s-hd": (50, 5.0, 10, (1, 3.16, 3.16), 1024, 0.7, "hunyuan", 256, 241, "kandinsky5pro_t2v_sft_10s"),
    "k5-pro-i2v-5s-hd": (50, 5.0, 5, (1, 3.16, 3.16), 1024, 0.8, "hunyuan", 256, 121, "kandinsky5pro_i2v_sft_5s"),
    "k5-lite-t2i-hd": (50, 3.5, 3, (1, 1, 1), 1024, None, "flux", 512, 1, "kandinsky5lite_t2i"),
    "k5-lite-i2i-hd": (50, 3.5, 3, (1, 1, 1), 1024, None, "flux", 512, 1, "kandinsky5lite_i2i"),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_preset_values_match_the_official_configs(name):
    steps, guidance, scale, rope, res, nabla_p, vae, qwen, frames, ckpt = REFERENCE[name]
    task = get_task(name)
    assert (task.steps, task.guidance, task.scheduler_scale) == (steps, guidance, scale)
    assert task.rope_scale == rope and task.resolution == res and task.vae == vae
    assert task.qwen_max_length == qwen and task.frames == frames
    assert task.checkpoint == ckpt + ".safetensors"
    assert (task.nabla.P if task.nabla else None) == nabla_p
    if task.nabla:
        assert (task.nabla.wT, task.nabla.wH, task.nabla.wW, task.nabla.add_sta, task.nabla.method) == (
            11,
            3,
            3,
            True,
            "topcdf",
        )
        assert task.size_multiple == 128
    else:
        assert task.size_multiple == 16


def test_architectures_of_the_families():
    lite, pro = get_task("k5-lite-t2v-5s-sd").dit_params, get_task("k5-pro-t2v-5s-sd").dit_params
    assert (lite["model_dim"], lite["ff_dim"], lite["time_dim"], lite["num_text_blocks"]) == (1792, 7168, 512, 2)
    assert (lite["num_visual_blocks"], lite["axes_dims"], lite["visual_cond"]) == (32, (16, 24, 24), True)
    assert (pro["model_dim"], pro["ff_dim"], pro["time_dim"], pro["num_text_blocks"]) == (4096, 16384, 1024, 4)
    assert (pro["num_visual_blocks"], pro["axes_dims"]) == (60, (32, 48, 48))
    image, edit = get_task("k5-lite-t2i-hd").dit_params, get_task("k5-lite-i2i-hd").dit_params
    assert (image["visual_cond"], image["instruct_type"], edit["instruct_type"]) == (False, None, "channel")


@pytest.mark.parametrize("name", [n for n in TASKS if n.startswith("tiny-")])
def test_tiny_presets_have_the_structure_of_an_official_one(name):
    tiny = get_task(name)
    family = {"t2v": "k5-lite-t2v-5s-sd", "i2v": "k5-lite-i2v-5s-sd", "t2i": "k5-lite-t2i-hd", "i2i": "k5-lite-i2i-hd"}[
        tiny.kind
    ]
    official = get_task(family)
    for field in ("kind", "vae", "qwen_max_length", "guidance", "scheduler_scale", "rope_scale"):
        assert getattr(tiny, field) == getattr(official, field), field
    for key in ("visual_cond", "instruct_type", "patch_size", "in_visual_dim", "out_visual_dim"):
        assert tiny.dit_params[key] == official.dit_params[key], key
    assert count_on_meta(name) < 1_000_000


def test_unknown_task_suggests_the_nearest_names():
    with pytest.raises(UnknownTaskError, match=r"unknown task 'k5-lite-t2v-5s'; did you mean 'k5-lite-t2v-5s-sd'"):
        get_task("k5-lite-t2v-5s")
    with pytest.raises(UnknownTaskError, match=r"unknown task 'zzz'\. Known tasks: k5-lite-t2i-hd"):
        get_task("zzz")


def test_presets_of_checkpoints_published_in_the_diffusers_layout_only_name_a_folder():
    for name in (
        "k5-pro-t2v-5s-distil-sd",
        "k5-pro-i2v-5s-distil-sd",
        "k5-lite-t2i-pretrain-hd",
        "k5-lite-i2i-pretrain-hd",
    ):
        task = get_task(name)
        assert task.diffusers_layout and task.default_checkpoint_path == f"weights/model/{task.checkpoint}"
    distilled = get_task("k5-pro-i2v-5s-distil-sd")
    assert (distilled.steps, distilled.guidance, distilled.image_in_condition) == (16, 1.0, True)
    assert not any(get_task(n).image_in_condition for n in OFFICIAL_TASKS if n != "k5-pro-i2v-5s-distil-sd")
