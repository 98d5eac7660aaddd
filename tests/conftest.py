import pytest

from kandinsky5.tiny import build_tiny_tree


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory):
    """The tiny weights tree, built once per test session."""
    return build_tiny_tree(tmp_path_factory.mktemp("weights"))
