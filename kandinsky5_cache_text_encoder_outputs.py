"""Encode the captions of a dataset config with Qwen2.5-VL and CLIP for training."""

from kandinsky5.cli import exit_not_implemented

if __name__ == "__main__":
    exit_not_implemented(__doc__, "Dataset config and the two pre-caching CLIs")
