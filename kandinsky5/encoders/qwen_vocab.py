"""Qwen2.5's tokenizer, shipped with this package, for a Qwen2.5-VL-7B that comes as one weights file.

ComfyUI's ``qwen_2.5_vl_7b.safetensors`` (and its ``_fp8_scaled`` variant) hold weights only. The
tokenizer is ``data/qwen2_5_tokenizer.json.gz``: Qwen2.5's 151,643 byte-level BPE ranks (the
``qwen.tiktoken`` file of the dashscope wheel, Apache-2.0) converted by transformers'
TikTokenConverter, with Qwen's pre-tokenizer pattern, NFC normalization and the 22 special tokens
at their official ids (``<|endoftext|>`` 151643 ... ``<|file_sep|>`` 151664). The test suite checks
that the prompt templates tokenize to the official prefix lengths with it.

To rebuild the data file: ``python -m kandinsky5.encoders.qwen_vocab qwen.tiktoken`` (the file is in
``dashscope-2.0.2-py3-none-any.whl`` under ``dashscope/resources/``).
"""

from __future__ import annotations

import gzip
import sys
from functools import cache
from pathlib import Path

TOKENIZER_FILE = Path(__file__).parent / "data" / "qwen2_5_tokenizer.json.gz"
QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# in id order from 151643, as Qwen2.5-VL's tokenizer_config.json lists them
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
]
FIRST_SPECIAL_ID = 151643
PAD_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_end|>"


def convert_tiktoken(path: str | Path):
    """A ``tokenizers.Tokenizer`` from Qwen's ``qwen.tiktoken`` ranks (needs the tiktoken package)."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(path), pattern=QWEN_PRETOKENIZE, extra_special_tokens=QWEN_SPECIAL_TOKENS
    )
    tokenizer = converter.converted()
    tokenizer.normalizer = normalizers.NFC()
    return tokenizer


@cache
def _tokenizer_json() -> str:
    return gzip.decompress(TOKENIZER_FILE.read_bytes()).decode("utf-8")


def packaged_qwen_tokenizer():
    """Qwen2.5's tokenizer as transformers uses it (right padding, Qwen's pad and end tokens)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        padding_side="right",
        model_max_length=32768,
    )
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m kandinsky5.encoders.qwen_vocab path/to/qwen.tiktoken")
    tokenizer = convert_tiktoken(args[0])
    for i, token in enumerate(QWEN_SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == FIRST_SPECIAL_ID + i, token
    TOKENIZER_FILE.write_bytes(gzip.compress(tokenizer.to_str().encode("utf-8"), 9, mtime=0))
    print(f"wrote {TOKENIZER_FILE} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
