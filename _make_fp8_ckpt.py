"""Convert a DiT checkpoint to block-scaled float8_e4m3fn weights.

The Linear weights of the text and visual transformer blocks are stored in fp8 with one fp32 scale
per --block_size input values (keys <module>.scale_weight); embeddings, norms and the output layer
keep their dtype. The file loads in the generation and training commands as it is, with or
without --fp8_base. The conversion streams one tensor at a time and writes atomically.

  python _make_fp8_ckpt.py --input kandinsky5pro_t2v_sft_5s.safetensors \\
      --output kandinsky5pro_t2v_sft_5s_fp8.safetensors
"""

import argparse
import sys

from kandinsky5.model.fp8_checkpoint import convert_to_fp8
from modules.fp8 import DEFAULT_BLOCK_SIZE
from modules.option_types import ScriptParser


def main(argv=None) -> None:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="DiT checkpoint (.safetensors, diffusers folder or index.json)")
    p.add_argument("--output", required=True, help="the fp8 .safetensors file to write")
    p.add_argument(
        "--block_size",
        type=int,
        default=DEFAULT_BLOCK_SIZE,
        help=f"input values per scale (default {DEFAULT_BLOCK_SIZE}; smaller is more exact, larger smaller)",
    )
    args = p.parse_args(argv)
    if args.block_size < 1:
        p.error("--block_size must be positive")
    try:
        count = convert_to_fp8(args.input, args.output, args.block_size)
    except ValueError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {args.output}: {count} weights in fp8")


if __name__ == "__main__":
    main()
