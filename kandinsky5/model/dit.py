"""The Kandinsky 5 diffusion transformer (DiT), with a batch dimension and masked text.

Module names and parameter shapes equal the official checkpoints (and diffusers'
``Kandinsky5Transformer3DModel``), so a state dict loads without renaming.

Precision follows the official model: the time embedding, every modulation, the
norm-scale-shift, the gated residual sums, the q/k RMSNorm and the rotary embedding run in fp32;
the other Linear layers and the attention kernel run in the compute dtype (the dtype of the
Linear weights). Which parameters stay fp32 whatever the compute dtype is declared once, in
``FP32_PARAMETER_PATTERNS``. The forward switches autocast off: under accelerate's mixed precision
it would run the fp32 Linear layers in bf16 or fp16, so training would compute something other
than generation. The compute dtype is the weights' dtype, which the loaders set.

Shapes: visual input (B, T, H, W, C) with C = 16, or 33 when visual conditioning / instruct
channels are present; text (B, L, in_text_dim) right-padded, with a key padding mask (B, L);
pooled text (B, in_text_dim2); time (B,) = sigma * 1000 in fp32. Output (B, T, H, W, 16).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kandinsky5.model.attention import AUTO, DEFAULT_BACKEND, attention, auto_backend, check_backend
from kandinsky5.model.fp32_steps import gated_add, modulate, rms_norm_rotate
from kandinsky5.model.nabla import check_grid, fractal_order, nabla_attention, raster_order
from kandinsky5.model.packed_projections import allocate_packed, packed_outputs
from kandinsky5.model.rope import RopeCache, frequencies, text_angles, visual_angles
from kandinsky5.model.sequence_parallel import (
    SequenceSplit,
    check_split,
    gather_tokens,
    heads_to_tokens,
    tokens_to_heads,
)
from kandinsky5.model.tasks import NablaParams
from modules.activation_offload import checkpoint_with_offload
from modules.block_swap import BlockSwap, swap_plan

# Parameters whose names contain one of these stay fp32 whatever the compute dtype.
FP32_PARAMETER_PATTERNS = ("time_embeddings", "modulation", "norm")
LAYER_NORM_EPS = 1e-5


def keeps_fp32(parameter_name: str) -> bool:
    return any(pattern in parameter_name for pattern in FP32_PARAMETER_PATTERNS)


def fp32_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer`` applied in fp32 (a no-op cast when its weights are already fp32, as they normally are).
    Layers of other kinds (fp8) dequantize to the input's dtype themselves."""
    if type(layer) is not nn.Linear:
        return layer(x.float())
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


class TimeEmbeddings(nn.Module):
    """Sinusoidal embedding of sigma*1000 (width model_dim) followed by a 2-layer MLP; fp32."""

    def __init__(self, model_dim: int, time_dim: int):
        super().__init__()
        self.model_dim = model_dim
        self.in_layer = nn.Linear(model_dim, time_dim)
        self.out_layer = nn.Linear(time_dim, time_dim)

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        args = torch.outer(time.float(), frequencies(self.model_dim, time.device))
        embed = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return fp32_linear(self.out_layer, F.silu(fp32_linear(self.in_layer, embed)))


class TextEmbeddings(nn.Module):
    """Linear projection (compute dtype) then an affine LayerNorm (fp32); returns the compute dtype."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        projected = self.in_layer(text.to(self.in_layer.weight.dtype))
        norm = self.norm
        weight, bias = norm.weight.float(), norm.bias.float()
        normed = F.layer_norm(projected.float(), norm.normalized_shape, weight, bias, eps=norm.eps)
        return normed.to(projected.dtype)


class VisualEmbeddings(nn.Module):
    """Patchify (B, T, H, W, C) into (B, T', H', W', pt*ph*pw*C) with channels fastest, then project."""

    def __init__(self, in_channels: int, model_dim: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.patch_size = tuple(patch_size)
        self.in_layer = nn.Linear(math.prod(patch_size) * in_channels, model_dim)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h, w, c = x.shape
        pt, ph, pw = self.patch_size
        patches = x.view(b, t // pt, pt, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return patches.reshape(b, t // pt, h // ph, w // pw, -1)

    def project(self, patches: torch.Tensor) -> torch.Tensor:
        """The per-token projection of patches (any leading shape)."""
        return self.in_layer(patches.to(self.in_layer.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.patchify(x))


class Modulation(nn.Module):
    """SiLU then Linear(time_dim -> n * model_dim); fp32. Returns (B, 1, n * model_dim)."""

    def __init__(self, time_dim: int, model_dim: int, num_params: int):
        super().__init__()
        self.out_layer = nn.Linear(time_dim, num_params * model_dim)

    def forward(self, time_embed: torch.Tensor) -> torch.Tensor:
        return fp32_linear(self.out_layer, F.silu(time_embed.float()))[:, None]


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm (fp32) and optional rotary embedding (fp32)."""

    def __init__(self, model_dim: int, head_dim: int):
        super().__init__()
        self.num_heads = model_dim // head_dim
        self.to_query = nn.Linear(model_dim, model_dim)
        self.to_key = nn.Linear(model_dim, model_dim)
        self.to_value = nn.Linear(model_dim, model_dim)
        self.query_norm = nn.RMSNorm(head_dim)
        self.key_norm = nn.RMSNorm(head_dim)
        self.out_layer = nn.Linear(model_dim, model_dim)
        self.split: SequenceSplit | None = None  # visual self-attention under sequence parallelism

    def _project(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x is context and (qkv := packed_outputs((self.to_query, self.to_key, self.to_value), x)) is not None:
            return qkv
        kv = packed_outputs((self.to_key, self.to_value), context)
        if kv is None:
            kv = self.to_key(context), self.to_value(context)
        return self.to_query(x), *kv

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        key_mask: torch.Tensor | None,
        rope: torch.Tensor | None,
        backend: str,
        sparse: tuple | None = None,
    ) -> torch.Tensor:
        """``sparse``: (token grid, NABLA parameters) for block-sparse visual self-attention."""
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)) for t in self._project(x, context))
        q, k = rms_norm_rotate(self.query_norm, q, rope, v.dtype), rms_norm_rotate(self.key_norm, k, rope, v.dtype)
        if self.split is not None:  # every token, this process's heads
            q, k, v = (tokens_to_heads(t, self.split) for t in (q, k, v))
        if sparse is not None:
            out = nabla_attention(q, k, v, *sparse)
        else:
            out = attention(q, k, v, key_mask, backend)
        if self.split is not None:
            out = heads_to_tokens(out, self.split)
        return self.out_layer(out.flatten(-2))


class FeedForward(nn.Module):
    def __init__(self, model_dim: int, ff_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(model_dim, ff_dim, bias=False)
        self.out_layer = nn.Linear(ff_dim, model_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.gelu(self.in_layer(x)))


class TextBlock(nn.Module):
    """Text transformer block: self-attention with 1-D RoPE, then feed-forward."""

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int):
        super().__init__()
        self.text_modulation = Modulation(time_dim, model_dim, 6)
        self.self_attention = Attention(model_dim, head_dim)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(self, text, time_embed, rope, text_mask, backend: str) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_f, scale_f, gate_f = self.text_modulation(time_embed).chunk(6, dim=-1)
        out = modulate(text, shift_a, scale_a, LAYER_NORM_EPS)
        text = gated_add(text, gate_a, self.self_attention(out, out, text_mask, rope, backend))
        out = modulate(text, shift_f, scale_f, LAYER_NORM_EPS)
        return gated_add(text, gate_f, self.feed_forward(out))


class VisualBlock(nn.Module):
    """Visual transformer block: self-attention with 3-D RoPE, cross-attention to the text, feed-forward."""

    def __init__(self, model_dim: int, time_dim: int, ff_dim: int, head_dim: int):
        super().__init__()
        self.visual_modulation = Modulation(time_dim, model_dim, 9)
        self.self_attention = Attention(model_dim, head_dim)
        self.cross_attention = Attention(model_dim, head_dim)
        self.feed_forward = FeedForward(model_dim, ff_dim)

    def forward(self, visual, text, time_embed, rope, text_mask, backend: str, sparse=None) -> torch.Tensor:
        params = self.visual_modulation(time_embed).chunk(9, dim=-1)
        shift, scale, gate = params[0:3]
        out = modulate(visual, shift, scale, LAYER_NORM_EPS)
        visual = gated_add(visual, gate, self.self_attention(out, out, None, rope, backend, sparse))
        shift, scale, gate = params[3:6]
        out = modulate(visual, shift, scale, LAYER_NORM_EPS)
        visual = gated_add(visual, gate, self.cross_attention(out, text, text_mask, None, backend))
        shift, scale, gate = params[6:9]
        out = modulate(visual, shift, scale, LAYER_NORM_EPS)
        return gated_add(visual, gate, self.feed_forward(out))


class OutLayer(nn.Module):
    """Final modulated LayerNorm and projection back to latent patches."""

    def __init__(self, model_dim: int, time_dim: int, out_channels: int, patch_size: tuple[int, int, int]):
        super().__init__()
        self.modulation = Modulation(time_dim, model_dim, 2)
        self.out_layer = nn.Linear(model_dim, math.prod(patch_size) * out_channels)

    def forward(self, visual: torch.Tensor, time_embed: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(time_embed).chunk(2, dim=-1)
        return self.out_layer(modulate(visual, shift, scale, LAYER_NORM_EPS))


class DiffusionTransformer3D(nn.Module):
    """Kandinsky 5 DiT. The constructor takes the official ``dit_params`` keys."""

    def __init__(
        self,
        in_visual_dim: int = 16,
        out_visual_dim: int = 16,
        in_text_dim: int = 3584,
        in_text_dim2: int = 768,
        time_dim: int = 512,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        model_dim: int = 1792,
        ff_dim: int = 7168,
        num_text_blocks: int = 2,
        num_visual_blocks: int = 32,
        axes_dims: tuple[int, int, int] = (16, 24, 24),
        visual_cond: bool = False,
        instruct_type: str | None = None,
    ):
        super().__init__()
        if instruct_type not in (None, "channel"):
            raise ValueError(f"instruct_type must be None or 'channel', got {instruct_type!r}")
        head_dim = sum(axes_dims)
        if model_dim % head_dim:
            raise ValueError(f"model_dim {model_dim} is not a multiple of head_dim {head_dim} (= sum of axes_dims)")
        self.config: dict[str, Any] = dict(
            in_visual_dim=in_visual_dim,
            out_visual_dim=out_visual_dim,
            in_text_dim=in_text_dim,
            in_text_dim2=in_text_dim2,
            time_dim=time_dim,
            patch_size=tuple(patch_size),
            model_dim=model_dim,
            ff_dim=ff_dim,
            num_text_blocks=num_text_blocks,
            num_visual_blocks=num_visual_blocks,
            axes_dims=tuple(axes_dims),
            visual_cond=visual_cond,
            instruct_type=instruct_type,
        )
        self.patch_size = tuple(patch_size)
        self.axes_dims = tuple(axes_dims)
        self.head_dim = head_dim
        conditioned = visual_cond or instruct_type == "channel"
        # Conditioned models take [noisy latent, condition latent, mask] = 2 * C + 1 channels.
        self.in_channels = 2 * in_visual_dim + 1 if conditioned else in_visual_dim

        self.time_embeddings = TimeEmbeddings(model_dim, time_dim)
        self.text_embeddings = TextEmbeddings(in_text_dim, model_dim)
        self.pooled_text_embeddings = TextEmbeddings(in_text_dim2, time_dim)
        self.visual_embeddings = VisualEmbeddings(self.in_channels, model_dim, patch_size)
        self.text_transformer_blocks = nn.ModuleList(
            TextBlock(model_dim, time_dim, ff_dim, head_dim) for _ in range(num_text_blocks)
        )
        self.visual_transformer_blocks = nn.ModuleList(
            VisualBlock(model_dim, time_dim, ff_dim, head_dim) for _ in range(num_visual_blocks)
        )
        self.out_layer = OutLayer(model_dim, time_dim, out_visual_dim, patch_size)

        self.gradient_checkpointing = False
        self.activation_offload = False  # with gradient checkpointing: keep checkpointed inputs in CPU memory
        self.block_swap: BlockSwap | None = None
        self.attention_backend = DEFAULT_BACKEND
        self._rope = RopeCache()
        self.sequence_split: SequenceSplit | None = None

    @property
    def device(self) -> torch.device:
        return self.visual_embeddings.in_layer.weight.device

    def set_compute_dtype(self, dtype: torch.dtype) -> DiffusionTransformer3D:
        """Cast the parameters to ``dtype``, except those that stay fp32 (see FP32_PARAMETER_PATTERNS)."""
        for name, param in self.named_parameters():
            param.data = param.data.to(torch.float32 if keeps_fp32(name) else dtype)
        return self

    def allocate_packed_projections(self, dtype: torch.dtype, device: torch.device | str) -> None:
        """Give every attention's q, k, v uninitialized parameters lying side by side, to be filled in
        place by a loader: from then on one matmul computes all three (see
        kandinsky5/model/packed_projections.py). Names and shapes stay those of the checkpoints."""
        for module in self.modules():
            if isinstance(module, Attention):
                allocate_packed((module.to_query, module.to_key, module.to_value), dtype, device)

    def set_attention_backend(self, name: str) -> str:
        """Use backend ``name`` (``auto``: the fastest exact one installed for the model's device)."""
        if name == AUTO:
            name = auto_backend(self.device)
        check_backend(name, self.device)
        self.attention_backend = name
        return name

    def compile_blocks(self, **options) -> None:
        """torch.compile every transformer block (the first forward compiles; a new shape recompiles)."""
        for block in [*self.text_transformer_blocks, *self.visual_transformer_blocks]:
            block.compile(**options)

    def enable_sequence_parallel(self, split: SequenceSplit) -> None:
        """Split the visual tokens over ``split.size`` processes (kandinsky5/model/sequence_parallel.py);
        every process calls the DiT with the same inputs and gets the whole output."""
        check_split(split.size, self.visual_transformer_blocks[0].self_attention.num_heads)
        self.sequence_split = split
        for block in self.visual_transformer_blocks:
            block.self_attention.split = split

    def enable_block_swap(self, requested: int, device: torch.device | str) -> int:
        """Keep ``requested`` blocks (the last ones in execution order, text blocks then visual blocks) in
        CPU memory and everything else on ``device``; returns the number swapped (clamped, with a warning)."""
        blocks = [*self.text_transformer_blocks, *self.visual_transformer_blocks]
        swapped, count = swap_plan(len(blocks), requested)
        if count < requested:
            warnings.warn(
                f"--blocks_to_swap {requested} is more than the {len(blocks)} blocks; swapping {count}", stacklevel=2
            )
        block_ids = {id(b) for b in blocks}
        for module in self.children():  # everything outside the blocks goes to the device
            if id(module) not in block_ids and not isinstance(module, nn.ModuleList):
                module.to(device)
        self.block_swap = BlockSwap(blocks, swapped, device)
        return count

    def _run_block(self, index: int, block: nn.Module, *args) -> torch.Tensor:
        def run(*inputs):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                if self.activation_offload:
                    return checkpoint_with_offload(block, *inputs)
                return checkpoint(block, *inputs, use_reentrant=False)
            return block(*inputs)

        if self.block_swap is None:
            return run(*args)
        return self.block_swap.run(index, run, *args)

    def _check_input(self, x: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor) -> None:
        b, t, h, w, c = x.shape
        if c != self.in_channels:
            raise ValueError(f"the DiT takes {self.in_channels} latent channels, got {c} (input {tuple(x.shape)})")
        pt, ph, pw = self.patch_size
        if t % pt or h % ph or w % pw:
            raise ValueError(f"latent size (T={t}, H={h}, W={w}) is not divisible by the patch size {self.patch_size}")
        if text.shape[0] != b or pooled.shape[0] != b:
            raise ValueError(f"batch sizes differ: latents {b}, text {text.shape[0]}, pooled text {pooled.shape[0]}")

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        pooled_text: torch.Tensor,
        time: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        rope_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
        nabla: NablaParams | None = None,
        visual_blocks_hook: Callable[[torch.Tensor, Callable[[slice], torch.Tensor]], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Predict the velocity for latents ``x`` at times ``time`` (sigma * 1000) given the text;
        ``nabla`` makes the visual self-attention block-sparse (see kandinsky5/model/nabla.py).
        ``visual_blocks_hook(visual, run_blocks)`` replaces the pass through the visual blocks:
        ``run_blocks(rows)`` runs them on a slice of the batch (MagCache uses it to skip them)."""
        self._check_input(x, text, pooled_text)
        with torch.autocast(x.device.type, enabled=False):
            return self._forward(x, text, pooled_text, time, text_mask, rope_scale, nabla, visual_blocks_hook)

    def _forward(self, x, text, pooled_text, time, text_mask, rope_scale, nabla, visual_blocks_hook) -> torch.Tensor:
        batch, device = x.shape[0], x.device
        if text_mask is not None and bool(text_mask.all()):
            text_mask = None  # nothing is padded: the unmasked kernels are faster
        time = time.float().reshape(-1).expand(batch)

        time_embed = self.time_embeddings(time) + self.pooled_text_embeddings(pooled_text).float()
        text_embed = self.text_embeddings(text)
        # patches, not model-width tokens, are ordered and split: a process projects only its own share
        patches = self.visual_embeddings.patchify(x)
        grid = tuple(patches.shape[1:4])
        patches = patches.flatten(1, 3)
        if nabla is not None:
            check_grid(grid)

        length = text.shape[1]
        text_rope = self._rope.get(("text", length, device), lambda: text_angles(length, self.head_dim, device))
        visual_rope = self._rope.get(
            ("visual", grid, tuple(rope_scale), device, nabla is not None),
            lambda: self._visual_angles(grid, rope_scale, device, nabla is not None),
        )
        sparse = None
        if nabla is not None:  # tokens in 8x8 tiles, the rotation angles reordered with them
            patches, sparse = fractal_order(patches, grid), (grid, nabla)

        split = self.sequence_split
        if split is not None:  # this process's share of the tokens, with their rotation angles
            heads = self.visual_transformer_blocks[0].self_attention.num_heads
            check_split(split.size, heads, {"this step": patches.shape[1]})
            patches, visual_rope = split.local(patches), split.local(visual_rope, dim=0)
        visual = self.visual_embeddings.project(patches)
        backend, text_count = self.attention_backend, len(self.text_transformer_blocks)
        for i, block in enumerate(self.text_transformer_blocks):
            text_embed = self._run_block(i, block, text_embed, time_embed, text_rope, text_mask, backend)

        def run_blocks(rows: slice) -> torch.Tensor:
            out, mask = visual[rows], None if text_mask is None else text_mask[rows]
            for i, block in enumerate(self.visual_transformer_blocks):
                out = self._run_block(
                    text_count + i, block, out, text_embed[rows], time_embed[rows], visual_rope, mask, backend, sparse
                )
            return out

        visual = run_blocks(slice(None)) if visual_blocks_hook is None else visual_blocks_hook(visual, run_blocks)
        out = self.out_layer(visual, time_embed)  # per token
        if split is not None:  # the output patches, 64 wide, gathered rather than the model-width tokens
            out = gather_tokens(out, split)
        if sparse is not None:
            out = raster_order(out, grid)
        return self._unpatchify(out, grid)

    def _visual_angles(self, grid, rope_scale, device, fractal: bool) -> torch.Tensor:
        angles = visual_angles(grid, self.axes_dims, rope_scale, device)
        return fractal_order(angles[None], grid)[0] if fractal else angles

    def _unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, T'H'W', C*pt*ph*pw) with channels slowest -> (B, T, H, W, C)."""
        b = out.shape[0]
        t, h, w = grid
        pt, ph, pw = self.patch_size
        out = out.view(b, t, h, w, -1, pt, ph, pw).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return out.reshape(b, t * pt, h * ph, w * pw, -1)
