"""The measured cases of benchmarks/run_all.py, each for our code ("ours") and diffusers ("peer").

A case returns a function doing one unit of work (one forward, one sampling step, ...). Both
sides get the same random weights (seeded) and the same inputs; see run_all.py for the table.
"""

from __future__ import annotations

import torch
from dit_forward import build, inputs

from kandinsky5.inference.denoiser import Denoiser, TextCondition, t2v_channels
from kandinsky5.model.tasks import get_task
from networks.lora_kandinsky import DEFAULT_INCLUDE

LORA_RANK = 16
GUIDANCE = 5.0


def _positions(frames: int, side: int, text_tokens: int, device: str):
    return [torch.arange(n, device=device) for n in (frames, side // 2, side // 2)], torch.arange(
        text_tokens, device=device
    )


def dit(side: str, a):
    """Each side's DiT with the same random weights; ours compiled per block with --compile."""
    model = build("ours" if side == "ours" else "diffusers", a.task, a.device)
    if side == "ours" and a.compile:
        model.compile_blocks()
    return model


def with_model(run, model):
    """``run`` carrying the DiT it runs (benchmarks/interleaved.py hooks its blocks)."""
    run.model = model
    return run


def dit_call(side: str, model, task_name: str, frames: int, latent_side: int, text_tokens: int, device: str):
    """model(x, text, pooled, time) with each side's calling convention."""
    rope = get_task(task_name).rope_scale
    if side == "ours":
        return lambda x, text, pooled, time_: model(x, text, pooled, time_, rope_scale=rope)
    positions, text_positions = _positions(frames, latent_side, text_tokens, device)
    return lambda x, text, pooled, time_: model(x, text, time_, pooled, positions, text_positions, rope).sample


def forward(side: str, a):
    model = dit(side, a)
    call = dit_call(side, model, a.task, a.frames, a.side, a.text_tokens, a.device)
    x, text, pooled, time_ = inputs(a.task, a.device, a.frames, a.side, a.text_tokens)

    def run():
        with torch.no_grad():
            call(x, text, pooled, time_)

    return with_model(run, model)


def forward_backward(side: str, a):
    """Forward and backward with frozen weights (the base model's work in a LoRA step)."""
    model = dit(side, a)
    call = dit_call(side, model, a.task, a.frames, a.side, a.text_tokens, a.device)
    x, text, pooled, time_ = inputs(a.task, a.device, a.frames, a.side, a.text_tokens)
    x.requires_grad_(True)

    def run():
        call(x, text, pooled, time_).float().square().mean().backward()
        x.grad = None

    return with_model(run, model)


def sampling_step(side: str, a):
    """One Euler step with classifier-free guidance: ours batches the two passes, the diffusers
    pipeline calls its transformer twice."""
    model = dit(side, a)
    x, text, pooled, time_ = inputs(a.task, a.device, a.frames, a.side, a.text_tokens)
    latent = x[..., :16].float()
    g = torch.Generator().manual_seed(2)
    uncond_text = torch.randn(text.shape, generator=g).to(text)
    if side == "ours":
        mask = torch.ones(1, a.text_tokens, dtype=torch.bool, device=a.device)
        cond, uncond = TextCondition(text, mask, pooled), TextCondition(uncond_text, mask, pooled)
        channels = t2v_channels(tuple(latent.shape[:4]), a.device)
        denoiser = Denoiser(model, cond, uncond, GUIDANCE, get_task(a.task).rope_scale, channels)

        def run():
            with torch.no_grad():
                return latent + (-0.02) * denoiser(latent, torch.tensor(0.9, device=a.device))

        return with_model(run, model)
    call = dit_call(side, model, a.task, a.frames, a.side, a.text_tokens, a.device)
    extra = torch.zeros(*latent.shape[:4], 17, device=a.device)

    def run():
        with torch.no_grad():
            model_in = torch.cat([latent, extra], dim=-1).to(x.dtype)
            v_cond = call(model_in, text, pooled, time_).float()
            v_uncond = call(model_in, uncond_text, pooled, time_).float()
            return latent + (-0.02) * (v_uncond + GUIDANCE * (v_cond - v_uncond))

    return with_model(run, model)


def training_step(side: str, a):
    """One LoRA optimizer step (rank 16 on the standard targets, AdamW, flow-matching loss);
    diffusers' side uses peft with the same target layers."""
    model = dit(side, a)
    g = torch.Generator().manual_seed(3)
    params = get_task(a.task).dit_params
    x0 = torch.randn(1, a.frames, a.side, a.side, 16, generator=g).to(a.device)
    text = torch.randn(1, a.text_tokens, params["in_text_dim"], generator=g).to(a.device, torch.bfloat16)
    pooled = torch.randn(1, params["in_text_dim2"], generator=g).to(a.device, torch.bfloat16)
    if side == "ours":
        from networks.lora_kandinsky import create_network

        network = create_network(model, LORA_RANK, LORA_RANK)
        network.apply_to(model)
        network.to(a.device).train()
        trainable = list(network.parameters())
    else:
        from peft import LoraConfig, inject_adapter_in_model

        targets = "|".join(f"(?:{p})" for p in DEFAULT_INCLUDE)
        inject_adapter_in_model(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=targets), model)
        trainable = [p for n, p in model.named_parameters() if "lora_" in n]
        for p in trainable:
            p.data = p.data.float()
            p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    call = dit_call(side, model, a.task, a.frames, a.side, a.text_tokens, a.device)
    extra = torch.zeros(*x0.shape[:4], 17, device=a.device)

    def run():
        noise = torch.randn_like(x0)
        sigma = torch.rand(1, device=a.device)
        x_t = (1 - sigma) * x0 + sigma * noise
        v = call(torch.cat([x_t, extra], dim=-1).to(torch.bfloat16), text, pooled, sigma * 1000)
        loss = (v.float() - (noise - x0)).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run


def vae_encode(side: str, a):
    """HunyuanVideo VAE encode of a short clip (random weights at the real size)."""
    from diffusers import AutoencoderKLHunyuanVideo

    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    pixels = torch.rand(1, 3, a.vae_frames, a.vae_side, a.vae_side, generator=torch.Generator().manual_seed(4))
    pixels = (pixels * 2 - 1).to(a.device, dtype)
    if side == "ours":
        from kandinsky5.encoders.vae import load_vae

        vae = load_vae(a.vae_folder, "hunyuan", a.device, dtype)

        def run():
            with torch.no_grad():
                return vae.encode(pixels, torch.Generator(a.device).manual_seed(0))

        return run
    model = AutoencoderKLHunyuanVideo.from_pretrained(a.vae_folder).to(a.device, dtype).eval()

    def run():
        with torch.no_grad():
            return model.encode(pixels).latent_dist.sample(torch.Generator(a.device).manual_seed(0)) * 0.476986

    return run


PROMPTS = [
    "A red car drives along a coastal road at sunset; the camera follows it from above, 35mm film.",
    "Two people dance in a neon-lit street while rain falls. Close-up, slow motion, shallow focus.",
    "An old lighthouse on a cliff, waves crashing against the rocks, golden hour, aerial view.",
    "A cat walks on the grass in a garden full of flowers, realistic style, soft morning light.",
]
# Qwen2.5-VL-7B's language model at its real width (the layer count is the benchmark's --qwen_layers)
QWEN_WIDTH = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)


def prompt_encoding(side: str, a):
    """Qwen2.5-VL encoding of a batch of prompts with the video template, the work of text-encoder
    caching: ours runs the language model without its vocabulary head and crops the template; the
    diffusers pipeline's encoder runs the whole model with all hidden states."""
    from kandinsky5.encoders.prompt_templates import TEMPLATES
    from kandinsky5.encoders.text_encoders import QwenEncoder

    dtype = torch.bfloat16
    encoder = QwenEncoder(a.qwen_folder, a.device, dtype)
    template = TEMPLATES["video"]
    if side == "ours":
        return lambda: encoder.encode(PROMPTS, template, 256)
    from diffusers import Kandinsky5T2VPipeline

    for module in encoder.model.modules():  # the peer keeps PyTorch's own bf16 kernels (no fp32 path)
        vars(module).pop("forward", None)
    pipe = Kandinsky5T2VPipeline.__new__(Kandinsky5T2VPipeline)  # only its Qwen encoding is used
    tokenizer = encoder.tokenizer
    pipe.tokenizer = lambda text, images=None, videos=None, **options: tokenizer(text, **options)
    pipe.text_encoder, pipe.prompt_template = encoder.model, template.text
    pipe.prompt_template_encode_start_idx = encoder.crop_length(template)
    return lambda: pipe._encode_prompt_qwen(PROMPTS, torch.device(a.device), 256, dtype)


CASES = {
    "DiT forward": forward,
    "DiT forward+backward": forward_backward,
    "sampling step (CFG)": sampling_step,
    "LoRA training step": training_step,
    "VAE encode": vae_encode,
    "prompt encoding (Qwen)": prompt_encoding,
}
