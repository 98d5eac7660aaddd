import pytest

from kandinsky5.tiny import build_tiny_tree


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory):
    """The tiny weights tree, built once per test session."""
    return build_tiny_tree(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def cached_dataset(tiny_tree, tmp_path_factory):
    """A 9-frame clip and two images (captions of different lengths, one batch of 2), cached for tiny-t2v:
    (root, config of both datasets, config of the clip alone)."""
    from .training_helpers import build_cached_dataset

    return build_cached_dataset(tiny_tree, tmp_path_factory.mktemp("training"))
