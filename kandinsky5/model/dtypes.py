"""The dtype names the options take, in a module of its own so that the scripts build their parsers
without importing the model code."""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Qwen's: a float dtype, or "fp8" (block-scaled float8 weights computed in bf16)
TEXT_ENCODER_DTYPES = {**DTYPES, "fp8": None}
