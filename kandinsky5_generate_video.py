"""Generate videos (T2V, I2V) and images (T2I, I2I) with a Kandinsky 5 DiT, optionally with LoRAs."""

from kandinsky5.cli import exit_not_implemented

if __name__ == "__main__":
    exit_not_implemented(__doc__, "Generation CLI: T2V, I2V, T2I and I2I with LoRA")
