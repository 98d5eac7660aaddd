"""The CLIP BPE tokenizer built from the vocabulary file shipped with this package.

ComfyUI's repackaged ``clip_l.safetensors`` holds weights only; the tokenizer is rebuilt here from
CLIP's byte-pair merges (``data/clip_bpe_simple_vocab_16e6.txt.gz``, MIT licensed, see
``data/CLIP_VOCAB_LICENSE.txt``), giving the same 49,408-token vocabulary as
openai/clip-vit-large-patch14 without any download.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import cache
from pathlib import Path

from transformers import CLIPTokenizer

BPE_FILE = Path(__file__).parent / "data" / "clip_bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses; the file holds more
CLIP_MAX_LENGTH = 77


def _byte_symbols() -> list[str]:
    """GPT-2 style printable stand-ins for the 256 byte values, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@cache
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def packaged_clip_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer from the shipped vocabulary, written as the vocab.json and merges.txt that every
    transformers version reads (4.x's CLIPTokenizer takes only files, 5.x's also dicts)."""
    vocab, merges = clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=CLIP_MAX_LENGTH)
