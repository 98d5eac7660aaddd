"""Encode the images and videos of a dataset config to VAE latents for training."""

from kandinsky5.cli import exit_not_implemented

if __name__ == "__main__":
    exit_not_implemented(__doc__, "Dataset config and the two pre-caching CLIs")
