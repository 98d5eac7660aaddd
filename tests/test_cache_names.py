"""Cache file names parse back to their item's key whatever the source is called (#33: an image whose
stem ends in digits and whose path hash is all digits was taken for a clip and left out of training)."""

from __future__ import annotations

import hashlib
import string
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from dataset.cache_files import item_key_of, latent_cache_name, text_cache_name
from dataset.config import load_dataset_config
from dataset.training_data import find_samples

from .media_factory import caption, write_image
from .training_helpers import cache_both

stems = st.text(alphabet=string.ascii_letters + string.digits + "-_. ", min_size=1, max_size=30)
hashes = st.one_of(
    *(st.text(alphabet=digits, min_size=8, max_size=8) for digits in ("0123456789", string.hexdigits[:16]))
)
clips = st.one_of(st.none(), st.tuples(st.integers(0, 99999), st.integers(1, 999)))
sizes = st.tuples(st.integers(16, 4096), st.integers(16, 4096))


@given(stems, hashes, clips, sizes)
def test_every_latent_and_text_cache_name_gives_back_its_key(stem, digest, clip, size):
    key = f"{stem}-{digest}"
    assert item_key_of(Path(latent_cache_name(key, size, clip))) == key
    assert item_key_of(Path(text_cache_name(key))) == key


def test_an_image_named_like_a_clip_field_with_an_all_digit_hash_is_trained(tiny_tree, tmp_path):
    # a folder whose path makes the image's 8-digit hash all decimal digits (about 1 in 40 folders)
    folder = next(
        folder
        for folder in (tmp_path / f"photos{i}" for i in range(2000))
        if hashlib.sha1(str((folder / "0001.png").resolve()).encode()).hexdigest()[:8].isdigit()
    )
    folder.mkdir()
    caption(write_image(folder / "0001.png", 64, 64, seed=1), "a cat")
    config = tmp_path / "data.toml"
    config.write_text(f'[[datasets]]\nimage_directory = "{folder}"\ncache_directory = "{tmp_path / "cache"}"\n'
                      "resolution = 64\n")  # fmt: skip
    cache_both(tiny_tree, config, "tiny-t2v", tiny_tree / "vae")
    (entry,) = [find_samples(d) for d in load_dataset_config(config)]
    assert entry.without_text == [] and len(entry.samples) == 1
