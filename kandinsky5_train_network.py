"""Train a LoRA on a Kandinsky 5 DiT from cached latents and text encoder outputs.

Run the two caching commands on the dataset config first, then for example:

  accelerate launch --num_cpu_threads_per_process 1 --mixed_precision bf16 kandinsky5_train_network.py \\
      --task k5-lite-t2v-5s-sd --dit weights/model/kandinsky5lite_t2v_sft_5s.safetensors \\
      --dataset_config data.toml --mixed_precision bf16 --sdpa --gradient_checkpointing \\
      --network_module networks.lora_kandinsky --network_dim 16 --network_alpha 16 \\
      --optimizer_type AdamW --learning_rate 1e-4 --max_train_epochs 16 --save_every_n_epochs 4 \\
      --output_dir output --output_name my_lora

Every option can also come from a TOML file (--config_file); options on the command line win.
See docs/training.md.
"""

import argparse
import sys
from pathlib import Path

import toml

from kandinsky5.cli import add_attention_arguments, add_nabla_arguments, add_task_argument
from kandinsky5.comfy_models import add_comfy_argument, fill_from_comfy
from kandinsky5.training.flow_matching import TIMESTEP_SAMPLING
from kandinsky5.training.trackers import CHOICES as TRACKER_CHOICES
from kandinsky5.training.train import TrainingInterrupted, train
from modules.optimizers import SCHEDULERS
from modules.option_types import (
    FINITE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    annotate_ranges,
    convert_config_value,
    number,
)

NETWORK_MODULE = "networks.lora_kandinsky"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config_file", help="TOML file of options (tables are flattened; the command line wins)")
    add_task_argument(p, default="k5-pro-t2v-5s-sd")
    data = p.add_argument_group("data and weights")
    data.add_argument("--dataset_config", help="the dataset config the caches were made from (required)")
    data.add_argument("--dit", help="DiT checkpoint to train on (required)")
    data.add_argument("--vae", help="VAE for --sample_prompts (default: weights/vae or weights/flux/vae)")
    data.add_argument(
        "--text_encoder_qwen", help="Qwen2.5-VL folder for --sample_prompts (default weights/text_encoder)"
    )
    data.add_argument("--text_encoder_clip", help="CLIP for --sample_prompts (default weights/text_encoder2)")
    add_comfy_argument(data)
    data.add_argument(
        "--max_data_loader_n_workers", type=NON_NEGATIVE_INT, default=2, help="processes loading cache files"
    )
    data.add_argument(
        "--persistent_data_loader_workers", action="store_true", help="keep the loader processes between epochs"
    )

    net = p.add_argument_group("LoRA")
    net.add_argument("--network_module", default=NETWORK_MODULE, help=f"must be {NETWORK_MODULE}")
    net.add_argument("--network_dim", type=POSITIVE_INT, default=16, help="LoRA rank (default 16)")
    net.add_argument(
        "--network_alpha",
        type=POSITIVE,
        default=None,
        help="LoRA alpha; scale = alpha / rank (default: the rank, i.e. scale 1)",
    )
    net.add_argument(
        "--network_dropout",
        type=number(0, 1, high_open=True),
        default=0.0,
        help="dropout on the LoRA's rank activations",
    )
    net.add_argument(
        "--network_args",
        nargs="*",
        help="key=value: include_patterns=[...], exclude_patterns=[...] "
        "(regular expressions on module paths), rank_dropout, module_dropout, loraplus_lr_ratio, verbose",
    )
    net.add_argument("--network_weights", help="LoRA file to continue training from")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--optimizer_type", default="AdamW", help="AdamW (default), AdamW8bit, Adafactor, or module.Class")
    opt.add_argument("--optimizer_args", nargs="*", help='key=value pairs, e.g. "weight_decay=0.01" "betas=(0.9,0.95)"')
    opt.add_argument("--learning_rate", type=POSITIVE, default=1e-4)
    opt.add_argument("--max_grad_norm", type=NON_NEGATIVE, default=1.0, help="gradient clipping norm; 0 disables")
    opt.add_argument("--lr_scheduler", default="constant", choices=SCHEDULERS)
    opt.add_argument(
        "--lr_warmup_steps",
        type=NON_NEGATIVE,
        default=0,
        help="warmup in optimizer steps, or a fraction (<1) of all steps",
    )
    opt.add_argument("--lr_scheduler_num_cycles", type=POSITIVE_INT, default=1, help="cosine_with_restarts cycles")
    opt.add_argument("--lr_scheduler_power", type=POSITIVE, default=1.0, help="polynomial power")
    opt.add_argument("--max_train_steps", type=POSITIVE_INT, default=1600, help="optimizer steps (default 1600)")
    opt.add_argument("--max_train_epochs", type=POSITIVE_INT, help="epochs; overrides --max_train_steps")
    opt.add_argument("--gradient_accumulation_steps", type=POSITIVE_INT, default=1)
    opt.add_argument(
        "--seed", type=NON_NEGATIVE_INT, default=42, help="seed of the noise, timesteps, LoRA init and batch order"
    )

    steps = p.add_argument_group("timesteps (t in [0, 1]; the DiT sees t * 1000, as at inference)")
    steps.add_argument("--timestep_sampling", default="shift", choices=TIMESTEP_SAMPLING)
    steps.add_argument("--discrete_flow_shift", type=POSITIVE, default=1.0, help="shift s of the 'shift' mode")
    steps.add_argument("--sigmoid_scale", type=POSITIVE, default=1.0, help="scale of the normal in sigmoid and shift")
    steps.add_argument("--logit_mean", type=FINITE, default=0.0, help="mean of logit_normal")
    steps.add_argument("--logit_std", type=POSITIVE, default=1.0, help="std of logit_normal")
    steps.add_argument("--min_timestep", type=number(0, 1000), default=0, help="lowest timestep on the 0-1000 scale")
    steps.add_argument(
        "--max_timestep", type=number(0, 1000, low_open=True), default=1000, help="highest timestep on the 0-1000 scale"
    )
    steps.add_argument(
        "--scheduler_scale",
        type=POSITIVE,
        help="sampling scheduler scale recorded in the metadata (default: the task's); it does not change training",
    )

    mem = p.add_argument_group("precision and memory")
    mem.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default="bf16",
        help="compute dtype of the DiT (LoRA weights stay fp32); bf16 by default",
    )
    mem.add_argument("--gradient_checkpointing", action="store_true", help="recompute each block in backward")
    mem.add_argument(
        "--fp8_base",
        action="store_true",
        help="store the DiT's block weights as block-scaled fp8 "
        "(frozen; the LoRA trains beside them in fp32); use with --gradient_checkpointing",
    )
    mem.add_argument(
        "--blocks_to_swap",
        type=NON_NEGATIVE_INT,
        default=0,
        help="keep this many transformer blocks in CPU memory, "
        "each moved to the GPU for its forward and its backward; more than exist is clamped",
    )
    mem.add_argument(
        "--gradient_checkpointing_cpu_offload",
        action="store_true",
        help="with --gradient_checkpointing: keep each block's checkpointed input in CPU memory until backward",
    )
    add_attention_arguments(p)
    add_nabla_arguments(p)

    out = p.add_argument_group("output and logging")
    out.add_argument("--output_dir", help="where LoRA files go (required)")
    out.add_argument("--output_name", default="lora", help="file name stem (default lora)")
    out.add_argument(
        "--save_every_n_epochs", type=POSITIVE_INT, help="save <name>-<epoch:06d>.safetensors every N epochs"
    )
    out.add_argument(
        "--save_every_n_steps", type=POSITIVE_INT, help="save <name>-step<step:08d>.safetensors every N steps"
    )
    out.add_argument("--save_last_n_epochs", type=POSITIVE_INT, help="keep only the last N epoch files")
    out.add_argument("--save_last_n_steps", type=POSITIVE_INT, help="keep only the last N step files")
    out.add_argument(
        "--save_state",
        action="store_true",
        help="with every saved LoRA, also save a state folder (<file>-state) to --resume from",
    )
    out.add_argument("--save_state_on_train_end", action="store_true", help="save a state folder with the final LoRA")
    out.add_argument("--resume", help="a state folder: continue that run exactly (step, epoch, optimizer, randomness)")
    data_val = p.add_argument_group("validation")
    data_val.add_argument(
        "--validation_dataset_config",
        help="a dataset config cached like the training one; its "
        "loss at fixed noise and timesteps is printed and logged",
    )
    data_val.add_argument(
        "--validate_every_n_steps", type=POSITIVE_INT, help="compute the validation loss every N steps"
    )
    sampling = p.add_argument_group("samples during training (main process only, into output_dir/sample/)")
    sampling.add_argument(
        "--sample_prompts",
        help="prompt file: one prompt per line with --w --h --f --d --s --g --n --i "
        "as for generation (defaults: 17 frames for video tasks, 20 steps)",
    )
    sampling.add_argument("--sample_every_n_steps", type=POSITIVE_INT, help="sample every N optimizer steps")
    sampling.add_argument("--sample_every_n_epochs", type=POSITIVE_INT, help="sample after every N epochs")
    sampling.add_argument("--sample_at_first", action="store_true", help="sample before training starts")
    out.add_argument("--logging_dir", help="log folder: tensorboard's logs, and wandb's local files")
    out.add_argument(
        "--log_with",
        choices=list(TRACKER_CHOICES),
        help="where losses, learning rate, validation loss and samples go: tensorboard (the default when "
        "--logging_dir is given), wandb (Weights & Biases; `wandb login` first, or WANDB_MODE=offline), or all",
    )
    out.add_argument(
        "--log_tracker_name", default="network_train", help="tensorboard's run folder name; wandb's project name"
    )
    out.add_argument("--wandb_run_name", help="the run's name in wandb (default: one wandb makes up)")
    out.add_argument("--wandb_api_key", help="wandb API key for this run (else `wandb login` or WANDB_API_KEY)")
    return annotate_ranges(p)


def read_config_file(path: str, p: argparse.ArgumentParser) -> dict:
    """Options from a TOML file, tables flattened; an unknown option is an error naming it."""
    try:
        raw = toml.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, toml.TomlDecodeError) as error:
        sys.exit(f"error: cannot read --config_file {path}: {error}")
    values = {}
    for key, value in raw.items():
        values.update(value if isinstance(value, dict) else {key: value})
    known = {action.dest for action in p._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        sys.exit(f"error: --config_file {path}: unknown option(s) {', '.join(unknown)}")
    try:  # each value checked by its option's type, as on the command line
        return {key: convert_config_value(p, key, value) for key, value in values.items()}
    except (ValueError, argparse.ArgumentTypeError) as error:
        sys.exit(f"error: --config_file {path}: {error}")


def main(argv=None) -> None:
    p = parser()
    first, _ = p.parse_known_args(argv)
    if first.config_file:
        p.set_defaults(**read_config_file(first.config_file, p))
    args = p.parse_args(argv)
    try:
        fill_from_comfy(args, args.task, ("dit", "vae", "text_encoder_qwen", "text_encoder_clip"))
    except ValueError as error:
        sys.exit(f"error: {error}")
    for name in ("dataset_config", "dit", "output_dir"):
        if not getattr(args, name):
            p.error(f"--{name} is required (on the command line or in --config_file)")
    if args.network_module != NETWORK_MODULE:
        p.error(f"--network_module must be {NETWORK_MODULE}")
    if args.min_timestep >= args.max_timestep:  # each is in range by its type; together they must make one
        sys.exit(
            f"error: need 0 <= --min_timestep < --max_timestep, got {args.min_timestep:g} and {args.max_timestep:g}"
        )
    try:
        final = train(args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    except TrainingInterrupted as stopped:
        print(stopped, file=sys.stderr)
        sys.exit(130)
    print(f"done: {final}")


if __name__ == "__main__":
    main()
