"""Peak memory of each stage of generation and training at the real architectures' widths, with random
weights: the VAE decode (HunyuanVideo and FLUX, tiled and in one piece), one DiT step (the CFG batch of
2), one LoRA training step (gradient checkpointing, as the spec's commands), and Qwen2.5-VL-7B encoding
a prompt (bf16 and fp8).

Each case runs in a process of its own and reports the peak of the device it runs on above what the
process held before the stage: torch.cuda.max_memory_allocated on a GPU; on a CPU the process's peak
anonymous memory (RssAnon, sampled every 5 ms; allocations above 1 MiB mapped on their own, so that
freed tensors leave it), which stands in for GPU memory. Figures from the CPU
are fp32 for the VAEs (PyTorch's CPU 3-D convolutions have no fast bf16 path) and bf16 for the DiT and
Qwen, as on a GPU.

Full-size stages are too slow on a CPU, so the DiT cases run the real widths at reduced depth (one text
block and one or three visual blocks) and at two token counts, from which the full model's figure
follows: the weights (exact, from the architecture) plus the activations, which grow linearly with the
tokens (measured slope) and, in training, by one stored block input per block (measured as the
difference between three blocks and one). The VAE cases are measured at two sizes, in one piece and
tiled, to show that tiled decoding stays flat while one piece grows with the pixels.

    python benchmarks/stage_memory.py                  # the whole plan (about 20 min on 2 CPU cores)
    python benchmarks/stage_memory.py --only vae dit   # some of it
    python benchmarks/stage_memory.py --json out.json  # also write the figures
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit_forward import child_result  # noqa: E402
from memory import PeakSampler  # noqa: E402

GIB = 2**30
MODELS = {"lite": "k5-lite-t2v-5s-sd", "pro": "k5-pro-t2v-5s-sd", "image": "k5-lite-t2i-hd"}


class DevicePeak:
    """The peak of the device above the moment it was made: CUDA's allocator, or the process's RssAnon."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.sampler = PeakSampler()
            self.start = self.sampler.reset()

    def stop(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.start
        return self.sampler.stop() - self.start


def vae_case(args) -> dict:
    from kandinsky5.encoders.vae import FLUX, HUNYUAN, VAE

    kind = HUNYUAN if args.vae == "hunyuan" else FLUX
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    with torch.device(args.device):
        model = kind.model_class.from_config(kind.default_config).to(dtype).eval()
    vae = VAE(model, kind)
    vae.set_decode_tiling(args.tiled)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    width, height = args.size
    latent = torch.randn(1, args.latent_frames, height // 8, width // 8, 16)
    peak = DevicePeak(args.device)
    began = time.perf_counter()
    vae.decode(latent)
    return {"peak": peak.stop(), "weights": weights, "seconds": time.perf_counter() - began, "dtype": str(dtype)}


def reduced_dit(model: str, visual_blocks: int, device: str):
    """The model's (a MODELS key or a task name) real widths with one text block and ``visual_blocks``
    visual blocks, random bf16."""
    from kandinsky5.model.dit import DiffusionTransformer3D
    from kandinsky5.model.tasks import get_task

    task = get_task(MODELS.get(model, model))
    params = {**task.dit_params, "num_text_blocks": 1, "num_visual_blocks": visual_blocks}
    with torch.device("meta"):
        dit = DiffusionTransformer3D(**params)
    dit.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.02, generator=generator)
    dit.set_compute_dtype(torch.bfloat16)
    dit.set_attention_backend("sdpa")
    return dit, params


def dit_inputs(params: dict, latent: list[int], batch: int, device: str):
    frames, height, width = latent
    channels = 2 * params["in_visual_dim"] + 1 if params["visual_cond"] or params["instruct_type"] else 16
    x = torch.randn(batch, frames, height, width, channels, device=device, dtype=torch.bfloat16)
    text = torch.randn(batch, 256, params["in_text_dim"], device=device, dtype=torch.bfloat16)
    pooled = torch.randn(batch, params["in_text_dim2"], device=device, dtype=torch.bfloat16)
    return x, text, pooled, torch.full((batch,), 500.0, device=device)


def dit_case(args) -> dict:
    dit, params = reduced_dit(args.model, args.visual_blocks, args.device)
    x, text, pooled, t = dit_inputs(params, args.latent, args.batch, args.device)
    began = time.perf_counter()
    if args.train:
        from networks.lora_kandinsky import create_network

        dit.requires_grad_(False)
        dit.gradient_checkpointing = True
        network = create_network(dit, 16, 16.0)
        network.apply_to(dit)
        network.to(args.device).train()
        lora = [p for p in network.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(lora, lr=1e-4)
        peak = DevicePeak(args.device)
        dit(x, text, pooled, t, rope_scale=(1.0, 2.0, 2.0)).float().square().mean().backward()
        optimizer.step()
    else:
        peak = DevicePeak(args.device)
        with torch.no_grad():
            dit(x, text, pooled, t, rope_scale=(1.0, 2.0, 2.0))
    tokens = args.latent[0] * (args.latent[1] // 2) * (args.latent[2] // 2)
    return {"peak": peak.stop(), "tokens": tokens, "seconds": time.perf_counter() - began}


def dit_weights(model: str) -> dict:
    """Bytes of the whole DiT's parameters: bf16 (fp32 where the model keeps fp32) and with --fp8_base."""
    from kandinsky5.model.checkpoint import expected_shapes
    from kandinsky5.model.dit import keeps_fp32
    from kandinsky5.model.tasks import get_task

    shapes = expected_shapes(get_task(MODELS[model]).dit_params)
    bf16 = fp8 = block = 0
    for name, shape in shapes.items():
        count = 1
        for side in shape:
            count *= side
        size = count * (4 if keeps_fp32(name) else 2)
        bf16 += size
        in_block = "transformer_blocks." in name and len(shape) == 2
        fp8 += count + count // 64 * 4 if in_block else size  # float8 plus one fp32 scale per 64 weights
        if name.startswith("visual_transformer_blocks.0."):
            block += count + count // 64 * 4 if len(shape) == 2 else size
    return {"bf16": bf16, "fp8": fp8, "fp8_visual_block": block}


def qwen_config(layers: int | None = None):
    """Qwen2.5-VL-7B's configuration as shipped with the package; ``layers`` reduces its depth."""
    from transformers import Qwen2_5_VLConfig

    from kandinsky5.encoders.qwen_single_file import CONFIG_FILE

    config = Qwen2_5_VLConfig(**json.loads(CONFIG_FILE.read_text()))
    if layers is not None:
        config.text_config.num_hidden_layers = layers
    return config


def qwen_weights() -> dict:
    """Bytes of Qwen2.5-VL-7B's weights: bf16, and with --text_encoder_dtype fp8 (the language model's
    Linear weights of its layers as float8 plus one fp32 scale per 64), counted on the meta device."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(qwen_config())
    bf16 = fp8 = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "language_model" in name and ".layers." in name:
            count = module.weight.numel()
            fp8 += count + count // 64 * 4 - 2 * count
    bf16 = sum(p.numel() * 2 for p in model.parameters())
    return {"bf16": bf16, "fp8": bf16 + fp8}


def text_case(args) -> dict:
    """One prompt of ``args.tokens`` tokens through Qwen at its real width and 2 of its 28 layers, as the
    prompt encoder runs it (the last hidden state), bf16; the peak above the weights is the activations."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device(args.device):
        model = Qwen2_5_VLForConditionalGeneration(qwen_config(layers=2)).to(torch.bfloat16).eval()
    tokens = torch.randint(0, 150000, (1, args.tokens), device=args.device)
    mask = torch.ones_like(tokens)
    peak = DevicePeak(args.device)
    began = time.perf_counter()
    with torch.no_grad():
        _ = model.model(input_ids=tokens, attention_mask=mask).last_hidden_state
    return {"peak": peak.stop(), "tokens": args.tokens, "seconds": time.perf_counter() - began, **qwen_weights()}


def child(args) -> None:
    if args.device == "cpu":
        # every allocation above 1 MiB gets its own mapping, returned on free, so that the process's
        # memory follows the live tensors (glibc's heap would keep freed activations and inflate it)
        from modules.memory import LOADING_MMAP_THRESHOLD, set_mmap_threshold

        set_mmap_threshold(LOADING_MMAP_THRESHOLD)
    cases = {"vae": vae_case, "dit": dit_case, "text": text_case}
    print(json.dumps(cases[args.stage](args)))


def run(stage: str, *options: str) -> dict:
    return child_result([sys.executable, __file__, "--child", stage, *options])


def vae_plan(device: str) -> list[dict]:
    rows = []
    for vae, sizes in (("hunyuan", ((256, 256), (512, 256))), ("flux", ((512, 512), (1024, 1024)))):
        frames = 2 if vae == "hunyuan" else 1
        for tiled in (False, True):
            for width, height in sizes:
                options = ["--vae", vae, "--size", str(width), str(height), "--latent_frames", str(frames)]
                result = run("vae", *options, *(["--tiled"] if tiled else []), "--device", device)
                pixel_frames = 4 * (frames - 1) + 1
                rows.append({"vae": vae, "tiled": tiled, "size": [width, height], "frames": pixel_frames, **result})
                print(
                    f"VAE {vae:7} {'tiled   ' if tiled else 'one piece'} {width}x{height}x{pixel_frames}: "
                    f"peak {result['peak'] / GIB:.2f} GiB above the weights ({result['weights'] / GIB:.2f} GiB, "
                    f"{result['dtype']}), {result['seconds']:.0f} s",
                    flush=True,
                )
    return rows


def dit_plan(device: str, models: list[str]) -> list[dict]:
    rows = []
    # latents of 512x768 px (64x96): one or four latent frames, i.e. 1,536 and 6,144 tokens
    for model in models:
        weights = dit_weights(model)
        for train in (False, True):
            for blocks, frames in ((1, 1), (1, 4), (3, 4)) if train else ((1, 1), (1, 4)):
                options = ["--model", model, "--latent", str(frames), "64", "96", "--visual_blocks", str(blocks)]
                options += ["--batch", "1" if train else "2", "--device", device] + (["--train"] if train else [])
                result = run("dit", *options)
                rows.append({"model": model, "train": train, "visual_blocks": blocks, **result, "weights": weights})
                what = "LoRA step (checkpointing)" if train else "step (CFG batch 2)"
                print(
                    f"DiT {model:4} {what}, {blocks} visual block(s), {result['tokens']} tokens: "
                    f"peak {result['peak'] / GIB:.3f} GiB above the weights, {result['seconds']:.0f} s",
                    flush=True,
                )
    return rows


def text_plan(device: str) -> list[dict]:
    rows = []
    for tokens in (256, 1024):  # a prompt in the video template is about 250 tokens (up to 256 + the prefix)
        result = run("text", "--tokens", str(tokens), "--device", device)
        rows.append(result)
        print(
            f"Qwen2.5-VL-7B, {tokens} tokens: activations {result['peak'] / GIB:.3f} GiB (2 layers; the layers run "
            f"one after the other); weights bf16 {result['bf16'] / GIB:.2f} GiB, fp8 {result['fp8'] / GIB:.2f} GiB",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = ["text", "vae", "dit"]
    parser.add_argument("--only", nargs="*", choices=stages, default=stages, help="stages to run (default: all)")
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), default=sorted(MODELS), help="DiTs to measure")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--child", choices=stages, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--vae", choices=["hunyuan", "flux"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--latent_frames", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--tiled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", choices=sorted(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--latent", type=int, nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--visual_blocks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.stage = args.child
        child(args)
        return
    print(f"device {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    figures = {}
    if "text" in args.only:
        figures["text"] = text_plan(args.device)
    if "vae" in args.only:
        figures["vae"] = vae_plan(args.device)
    if "dit" in args.only:
        figures["dit"] = dit_plan(args.device, args.models)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
