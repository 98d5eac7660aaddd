"""Train a LoRA on a Kandinsky 5 DiT from cached latents and text encoder outputs."""

from kandinsky5.cli import exit_not_implemented

if __name__ == "__main__":
    exit_not_implemented(__doc__, "LoRA training")
