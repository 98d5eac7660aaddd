import math

from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dataset.buckets import bucket_sizes, choose_bucket
from kandinsky5.inference.media import resize_and_crop

resolutions = st.tuples(st.integers(128, 1280), st.integers(128, 1280))
steps = st.sampled_from([16, 128])
sizes = st.tuples(st.integers(16, 2000), st.integers(16, 2000))


@given(resolutions, steps)
def test_every_bucket_fits_the_area_with_sides_on_the_step(resolution, step):
    buckets = bucket_sizes(resolution, step)
    assert buckets
    for width, height in buckets:
        assert width * height <= resolution[0] * resolution[1]
        assert width % step == 0 and height % step == 0 and width > 0 and height > 0


@given(resolutions, steps, sizes)
def test_the_chosen_bucket_has_the_nearest_aspect_ratio(resolution, step, size):
    chosen = choose_bucket(*size, resolution, enable_bucket=True, no_upscale=False, step=step)
    distance = lambda wh: abs(math.log(wh[0] / wh[1]) - math.log(size[0] / size[1]))  # noqa: E731
    assert chosen in bucket_sizes(resolution, step)
    assert all(distance(chosen) <= distance(other) + 1e-12 for other in bucket_sizes(resolution, step))


@settings(max_examples=40, deadline=None)
@given(st.tuples(st.integers(16, 400), st.integers(16, 400)), st.sampled_from([(128, 128), (256, 160)]))
def test_resize_and_crop_gives_exactly_the_bucket(size, resolution):
    bucket = choose_bucket(*size, resolution, enable_bucket=True, no_upscale=False)
    assert resize_and_crop(Image.new("RGB", size), *bucket).size == bucket


def test_known_buckets_and_no_upscale():
    assert len(bucket_sizes((512, 512))) == 33 and len(bucket_sizes((768, 512))) == 41
    assert choose_bucket(1920, 1080, (512, 512), True, False) == (672, 384)
    assert choose_bucket(200, 100, (512, 512), True, True) == (192, 96)  # small input: not upscaled
    assert choose_bucket(1920, 1080, (512, 512), False, False) == (512, 512)  # buckets off: the resolution
