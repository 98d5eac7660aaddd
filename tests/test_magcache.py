import pytest
import torch

from kandinsky5.inference.denoiser import Denoiser, t2v_channels
from kandinsky5.inference.magcache import MagCache, ratios_for_steps, task_ratios
from kandinsky5.inference.sampling import flow_schedule, sample_euler
from kandinsky5.model.rope import frequencies
from kandinsky5.model.tasks import OFFICIAL_TASKS

from .dit_helpers import random_dit
from .generation_helpers import generate
from .test_sampling import text

WITH_RATIOS = [name for name in OFFICIAL_TASKS if "distil" not in name and "pretrain" not in name and "i2i" not in name]


@pytest.mark.parametrize("name", WITH_RATIOS)
def test_every_sft_task_has_100_ratios(name):
    ratios = task_ratios(name)
    assert len(ratios) == 100 and ratios[:2] == [1.0, 1.0]
    assert all(0.7 < r < 1.2 for r in ratios[0::2])  # the cond list; no-CFG tasks have 0 in the uncond slots


@pytest.mark.parametrize("name", ["k5-lite-t2v-5s-distil-sd", "k5-lite-t2v-5s-pretrain-sd", "k5-lite-i2i-hd"])
def test_tasks_without_ratios_are_refused_by_name(name):
    with pytest.raises(ValueError, match=name):
        task_ratios(name)


def test_ratios_are_resampled_to_the_step_count_by_nearest_index():
    ratios = [float(i) for i in range(100)]  # cond = 0, 2, 4, ...; uncond = 1, 3, 5, ...
    cond, uncond = ratios_for_steps(ratios, 50)
    assert cond == ratios[0::2] and uncond == ratios[1::2]
    cond, uncond = ratios_for_steps(ratios, 4)  # indices round(0, 16.33, 32.67, 49) = 0, 16, 33, 49
    assert cond == [0.0, 32.0, 66.0, 98.0] and uncond == [1.0, 33.0, 67.0, 99.0]
    assert ratios_for_steps(ratios, 1) == ([0.0], [1.0])


def official_skip_pattern(ratios, steps, cfg, threshold=0.12, max_skips=2, retention=0.2):
    """The official call-counter algorithm written out: which (step, pass) reuse the residual."""
    cnt, state, skipped = 0, {0: [1.0, 0, 0.0], 1: [1.0, 0, 0.0]}, []
    while cnt < 2 * steps:
        p = cnt % 2
        skip = False
        if cnt >= int(2 * steps * retention):
            s = state[p]
            s[0] *= ratios[cnt]
            s[1] += 1
            s[2] += abs(1 - s[0])
            skip = s[2] < threshold and s[1] <= max_skips
            if not skip:
                state[p] = [1.0, 0, 0.0]
        if skip:
            skipped.append((cnt // 2, p))
        cnt += 1 if cfg else 2
    return skipped


@pytest.mark.parametrize(
    "task,cfg", [("k5-lite-t2v-5s-sd", True), ("k5-pro-t2v-5s-sd", True), ("k5-lite-t2v-5s-nocfg-sd", False)]
)
@pytest.mark.parametrize("batched", [True, False])
def test_skip_decisions_follow_the_official_counter(task, cfg, batched):
    ratios, steps = task_ratios(task), 50
    cache = MagCache(ratios, steps, num_blocks=32)
    visual = torch.randn(2 if batched and cfg else 1, 4, 8)
    ran = []

    def run_blocks(rows):  # the block stack stands in as a fixed function of its input
        ran.append(rows)
        return visual[rows] * 2.0 + 1.0

    skipped = []
    for step in range(steps):
        cache.next_step()
        if not cfg:
            passes = [[(0, slice(None))]]
        elif batched:
            passes = [[(0, slice(0, 1)), (1, slice(1, 2))]]
        else:
            passes = [[(0, slice(None))], [(1, slice(None))]]
        for streams in passes:
            ran.clear()
            out = cache.hook(streams)(visual[: 2 if len(streams) == 2 else 1], run_blocks)
            torch.testing.assert_close(out, visual[: out.shape[0]] * 2.0 + 1.0)  # a skip reuses the same residual
            computed = {s for s, rows in streams if any(r == rows or r == slice(None) for r in ran)}
            skipped += [(step, s) for s, _ in streams if s not in computed]
    assert skipped == official_skip_pattern(ratios, steps, cfg)
    assert len(skipped) > 10
    assert cache.skipped_passes == len(skipped)


def run_sampler(dit, magcache, batched=True, guidance=5.0, steps=50):
    cond, uncond = text(7, 1), text(3, 2)
    noise = torch.randn(1, 3, 8, 8, 16, generator=torch.Generator().manual_seed(3))
    denoiser = Denoiser(
        dit,
        cond,
        uncond,
        guidance,
        (1.0, 2.0, 2.0),
        t2v_channels((1, 3, 8, 8), "cpu"),
        batched_cfg=batched,
        magcache=magcache,
    )
    with torch.no_grad():
        return sample_euler(denoiser, noise, flow_schedule(steps, 10.0))


@pytest.mark.parametrize("batched", [True, False])
def test_threshold_zero_equals_plain_sampling(batched):
    dit = random_dit("tiny-t2v")
    cache = MagCache(task_ratios("tiny-t2v"), 50, 3, threshold=0.0)
    assert torch.equal(run_sampler(dit, cache, batched), run_sampler(dit, None, batched))
    assert cache.skipped_passes == 0 and cache.passes == 100


def smooth_in_time(dit):
    """A random DiT reads every frequency of the sinusoidal time embedding, so its output jumps
    from one step to the next; a trained one varies smoothly over the schedule, which is what
    MagCache relies on. Keeping only the slow time features (under 0.005 rad per unit of sigma*1000)
    gives a random model with that property."""
    f = frequencies(dit.config["model_dim"], "cpu")
    with torch.no_grad():
        dit.time_embeddings.in_layer.weight[:, torch.cat([f, f]) >= 0.005] = 0
    return dit


@pytest.mark.parametrize("batched", [True, False])
def test_default_threshold_skips_and_stays_close(batched):
    dit = smooth_in_time(random_dit("tiny-t2v"))
    cache = MagCache(task_ratios("tiny-t2v"), 50, 3)
    plain, cached = run_sampler(dit, None, batched), run_sampler(dit, cache, batched)
    assert cache.skipped_passes >= 40  # of 100 passes (measured: 52)
    relative = ((cached - plain).norm() / plain.norm()).item()
    assert 0 < relative < 0.05  # measured: 0.030


def test_batched_and_separate_passes_make_the_same_decisions():
    dit = random_dit("tiny-t2v")
    a, b = MagCache(task_ratios("tiny-t2v"), 50, 3), MagCache(task_ratios("tiny-t2v"), 50, 3)
    torch.testing.assert_close(run_sampler(dit, a, True), run_sampler(dit, b, False), rtol=1e-4, atol=1e-4)
    assert a.skipped_passes == b.skipped_passes


def test_cli_prints_the_skipped_passes(tiny_tree, tmp_path, capsys):
    generate(
        tiny_tree, "tiny-t2v", "--prompt", "a dog", "--steps", "20", "--magcache", "--output", str(tmp_path / "a.mp4")
    )
    out = capsys.readouterr().out
    assert "MagCache skipped the visual blocks on" in out and (tmp_path / "a.mp4").exists()


def test_cli_refuses_magcache_for_a_task_without_ratios(tiny_tree, capsys):
    with pytest.raises(SystemExit):
        generate(tiny_tree, "tiny-i2i", "--prompt", "x", "--magcache")
    assert "no MagCache ratios" in capsys.readouterr().err
