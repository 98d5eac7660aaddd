"""Convert a DiT checkpoint to block-scaled float8_e4m3fn weights."""

from kandinsky5.cli import exit_not_implemented

if __name__ == "__main__":
    exit_not_implemented(__doc__, "Memory: fp8 weights, _make_fp8_ckpt.py, block swap and activation offload")
