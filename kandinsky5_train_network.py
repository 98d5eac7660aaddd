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
import os
import sys
from pathlib import Path

import toml

from kandinsky5.cli import (
    add_attention_arguments,
    add_nabla_arguments,
    add_task_argument,
    add_vae_tiling_arguments,
    check_vae_tiling,
    given_options,
)
from kandinsky5.comfy_models import add_comfy_argument, fill_from_comfy
from kandinsky5.model.memory_presets import add_vram_argument
from kandinsky5.musubi_options import TRAINING_NOTICES, add_notice_options, announce_notices
from kandinsky5.training.first_checks import first_checks
from kandinsky5.training.timesteps import SAMPLINGS, WEIGHTING_SCHEMES
from kandinsky5.training.trackers import CHOICES as TRACKER_CHOICES
from modules.optimizers import SCHEDULERS
from modules.option_types import (
    FINITE,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    ScriptParser,
    annotate_ranges,
    convert_config_value,
    integer,
    number,
)
from networks.network_args import ADAPTERS, check_network_args

NETWORK_MODULE = "networks.lora_kandinsky"
NETWORK_MODULES = tuple(ADAPTERS)


def parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__)
    p.add_argument("--config_file", help="TOML file of options (tables are flattened; the command line wins)")
    add_task_argument(p, default="k5-pro-t2v-5s-sd")
    data = p.add_argument_group("data and weights")
    data.add_argument("--dataset_config", help="the dataset config the caches were made from (required)")
    data.add_argument(
        "--skip_damaged_caches",
        action="store_true",
        help="leave out the items whose cache files are damaged (cut short, empty, unreadable), listing them; "
        "by default training stops and names those files with the command that rebuilds them",
    )
    data.add_argument("--dit", help="DiT checkpoint to train on (required)")
    data.add_argument(
        "--i2v_mode",
        choices=["first", "first_last"],
        default="first",
        help="I2V: first frame only, or also the last (in the last latent frame's conditioning)",
    )
    data.add_argument(
        "--first_last_probability", type=number(0, 1), default=1.0, help="share of samples given their last frame"
    )
    data.add_argument("--vae", help="VAE for --sample_prompts (default: weights/vae or weights/flux/vae)")
    data.add_argument(
        "--text_encoder_qwen", help="Qwen2.5-VL folder for --sample_prompts (default weights/text_encoder)"
    )
    data.add_argument("--text_encoder_clip", help="CLIP for --sample_prompts (default weights/text_encoder2)")
    add_comfy_argument(data)
    data.add_argument(
        "--vae_dtype", choices=["float32", "bfloat16", "float16"], help="VAE dtype for samples (default: float32)"
    )
    data.add_argument(
        "--offload_dit_during_sampling",
        action="store_true",
        help="move the DiT to CPU memory while the samples are decoded (room for the VAE on small GPUs)",
    )
    data.add_argument(
        "--max_data_loader_n_workers", type=NON_NEGATIVE_INT, default=2, help="processes loading cache files"
    )
    data.add_argument(
        "--persistent_data_loader_workers", action="store_true", help="keep the loader processes between epochs"
    )

    net = p.add_argument_group("LoRA, LoHa, LoKr, DoRA and EMA")
    net.add_argument(
        "--network_module",
        default=NETWORK_MODULE,
        metavar="MODULE",
        choices=NETWORK_MODULES,
        help="networks.lora_kandinsky (LoRA, default), networks.loha_kandinsky (LoHa), networks.lokr_kandinsky "
        "(LoKr); DoRA: --network_args dora_wd=True",
    )
    net.add_argument("--network_dim", type=POSITIVE_INT, default=16, help="rank (default 16)")
    net.add_argument(
        "--network_alpha",
        type=POSITIVE,
        default=None,
        help="alpha; scale = alpha / rank (default: the rank, i.e. scale 1; LoKr with a whole w2 always scales 1)",
    )
    net.add_argument(
        "--network_dropout",
        type=number(0, 1, high_open=True),
        default=0.0,
        help="dropout on the LoRA's rank activations (LoHa, LoKr: on the update)",
    )
    net.add_argument(
        "--network_args",
        nargs="*",
        help="key=value: include_patterns=[...], exclude_patterns=[...] (regular expressions on module paths), "
        "rank_dropout, module_dropout, dora_wd=True (DoRA), verbose; LoRA: loraplus_lr_ratio; LoKr: factor=N",
    )
    net.add_argument("--network_weights", help="LoRA file to continue training from")
    net.add_argument(
        "--dim_from_weights", action="store_true", help="take --network_dim (the rank) from --network_weights"
    )
    net.add_argument(
        "--base_weights",
        nargs="*",
        help="LoRA files merged into the DiT before training (the trained LoRA learns on top of them)",
    )
    net.add_argument(
        "--base_weights_multiplier", type=FINITE, nargs="*", help="one strength per --base_weights file (default 1)"
    )
    net.add_argument(
        "--scale_weight_norms",
        type=POSITIVE,
        help="after each step, scale down every LoRA module whose update (up @ down * alpha/rank) has a norm "
        "above this (1 is a common start); the scaled count and the norms are logged",
    )
    net.add_argument(
        "--ema_decay",
        metavar="D",
        type=number(0, 1, low_open=True, high_open=True),
        help="keep an average of the weights, ema = decay * ema + (1 - decay) * weights (0.99 to 0.9999 usual), "
        "saved as <name>-ema.safetensors beside each save (default: none)",
    )
    net.add_argument("--ema_start_step", metavar="N", type=NON_NEGATIVE_INT, default=0, help="the EMA's first step")
    net.add_argument("--ema_update_every", metavar="N", type=POSITIVE_INT, default=1, help="the EMA's step interval")
    net.add_argument(
        "--ema_device",
        choices=["training", "cpu"],
        default="training",
        help="where the EMA is kept (default: the training device)",
    )

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
    opt.add_argument(
        "--lr_scheduler_min_lr_ratio",
        type=number(0, 1),
        help="lowest learning rate as a fraction of --learning_rate (cosine_with_min_lr, warmup_stable_decay)",
    )
    opt.add_argument("--lr_scheduler_timescale", type=POSITIVE_INT, help="inverse_sqrt timescale (default: the warmup)")
    opt.add_argument(
        "--lr_decay_steps",
        type=NON_NEGATIVE,
        default=0,
        help="warmup_stable_decay: decay steps, or a fraction (<1) of all steps",
    )
    opt.add_argument(
        "--lr_scheduler_type",
        help="a scheduler class by path (torch.optim.lr_scheduler.CosineAnnealingLR); replaces --lr_scheduler",
    )
    opt.add_argument("--lr_scheduler_args", nargs="*", help='key=value arguments, e.g. "T_max=100"')
    opt.add_argument("--max_train_steps", type=POSITIVE_INT, default=1600, help="optimizer steps (default 1600)")
    opt.add_argument("--max_train_epochs", type=POSITIVE_INT, help="epochs; overrides --max_train_steps")
    opt.add_argument("--gradient_accumulation_steps", type=POSITIVE_INT, default=1)
    opt.add_argument(
        "--seed", type=NON_NEGATIVE_INT, default=42, help="seed of the noise, timesteps, LoRA init and batch order"
    )

    steps = p.add_argument_group("timesteps (t in [0, 1]; the DiT sees t * 1000, as at inference)")
    steps.add_argument(
        "--timestep_sampling",
        default="shift",
        choices=SAMPLINGS,
        help="how t is drawn (musubi-tuner's samplings; see docs/training.md); default shift",
    )
    steps.add_argument(
        "--weighting_scheme",
        default="none",
        choices=WEIGHTING_SCHEMES,
        help="loss weight per timestep (sigma_sqrt, cosmap) and, for --timestep_sampling sigma, the density "
        "(logit_normal, mode)",
    )
    steps.add_argument("--mode_scale", type=FINITE, default=1.29, help="scale of the 'mode' weighting scheme")
    steps.add_argument(
        "--num_timestep_buckets",
        type=integer(2),
        help="draw the timesteps stratified over this many equal buckets of the [0, 1] range",
    )
    steps.add_argument(
        "--preserve_distribution_shape",
        action="store_true",
        help="keep t in [--min_timestep, --max_timestep] by redrawing instead of rescaling the draw",
    )
    steps.add_argument(
        "--show_timesteps",
        choices=["image", "console"],
        help="draw the timesteps and loss weights training would use, show them (a PNG in --output_dir, or a "
        "text histogram) and stop",
    )
    steps.add_argument("--flow_shift", type=POSITIVE, help="the same as --scheduler_scale (the samples' shift)")
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
    add_vram_argument(
        mem,
        "--fp8_base, --blocks_to_swap, --gradient_checkpointing and its CPU offload for the task and the largest "
        "cached sample",
    )
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
        "--sequence_parallel",
        type=POSITIVE_INT,
        default=1,
        metavar="N",
        help="split each step's tokens over N processes (N divides the heads; see docs/runs.md)",
    )
    mem.add_argument(
        "--gradient_checkpointing_cpu_offload",
        action="store_true",
        help="with --gradient_checkpointing: keep each block's checkpointed input in CPU memory until backward",
    )
    mem.add_argument("--full_bf16", action="store_true", help="LoRA weights, gradients and optimizer state in bf16")
    mem.add_argument("--full_fp16", action="store_true", help="LoRA weights, gradients and optimizer state in fp16")
    mem.add_argument("--cuda_allow_tf32", action="store_true", help="allow TF32 matmuls and convolutions on CUDA")
    mem.add_argument("--cuda_cudnn_benchmark", action="store_true", help="let cuDNN pick its fastest kernels")
    add_attention_arguments(p)
    add_nabla_arguments(p)
    add_vae_tiling_arguments(p)  # for the samples
    comp = p.add_argument_group("torch.compile (with --compile, or --dynamo_backend other than NO)")
    comp.add_argument("--compile_backend", default="inductor", help="torch.compile backend (default inductor)")
    comp.add_argument(
        "--compile_mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
    )
    comp.add_argument("--compile_dynamic", choices=["true", "false", "auto"], help="dynamic shapes (default auto)")
    comp.add_argument("--compile_fullgraph", action="store_true", help="compile each block as one graph")
    comp.add_argument("--compile_cache_size_limit", type=POSITIVE_INT, help="torch._dynamo.config.cache_size_limit")
    comp.add_argument(
        "--dynamo_backend",
        default="NO",
        help="a backend other than NO turns --compile on with that backend",
    )
    comp.add_argument("--dynamo_mode", choices=["default", "reduce-overhead", "max-autotune"], help="as --compile_mode")
    comp.add_argument("--dynamo_dynamic", action="store_true", help="as --compile_dynamic true")
    comp.add_argument("--dynamo_fullgraph", action="store_true", help="as --compile_fullgraph")
    comp.add_argument("--ddp_timeout", type=POSITIVE_INT, metavar="MIN", help="minutes processes wait (default 30)")

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
    out.add_argument(
        "--save_last_n_steps",
        type=POSITIVE_INT,
        help="keep only the step files of the last N steps (musubi-tuner's meaning: N counts steps, not files; "
        "--save_every_n_steps 100 --save_last_n_steps 300 keeps 4 files)",
    )
    out.add_argument(
        "--save_last_n_epochs_state",
        type=POSITIVE_INT,
        help="keep the last N epoch states (default: as --save_last_n_epochs)",
    )
    out.add_argument(
        "--save_last_n_steps_state",
        type=POSITIVE_INT,
        help="keep the step states of the last N steps (default: as --save_last_n_steps)",
    )
    out.add_argument(
        "--save_precision", choices=["float", "fp16", "bf16"], default="float", help="dtype of the saved LoRA files"
    )
    meta = p.add_argument_group("metadata of the saved LoRA files (ss_* and modelspec.* keys)")
    meta.add_argument("--no_metadata", action="store_true", help="save the weights without any metadata")
    meta.add_argument("--training_comment", help="free text stored as ss_training_comment")
    meta.add_argument(
        "--trigger_word",
        help="the word(s) your captions use for what the LoRA learns; stored as the file's 'trigger' metadata "
        "(followed by a space), which generation and the official pipelines put before each expanded prompt",
    )
    for key, what in (
        ("title", "title (default: --output_name)"),
        ("author", "author"),
        ("description", "description"),
        ("license", "license"),
        ("tags", "tags, comma-separated"),
        ("reso", 'resolution, e.g. "768,512"'),
        ("arch", "architecture (default Kandinsky-5/lora)"),
    ):
        meta.add_argument(f"--metadata_{key}", help=f"modelspec.{key}: {what}")
    hub = p.add_argument_group("uploading to Hugging Face (after each file is safely on disk; a failure is a warning)")
    hub.add_argument("--huggingface_repo_id", help="repository to upload the saved LoRA files to")
    hub.add_argument("--huggingface_repo_type", default="model", help="model (default), dataset or space")
    hub.add_argument("--huggingface_path_in_repo", default="", help="folder in the repository")
    hub.add_argument("--huggingface_token", help="token (else HF_TOKEN or `hf auth login`)")
    hub.add_argument(
        "--huggingface_repo_visibility", choices=["public", "private"], help="of a repository created (default private)"
    )
    hub.add_argument("--save_state_to_huggingface", action="store_true", help="upload the state folders too")
    hub.add_argument(
        "--resume_from_huggingface",
        action="store_true",
        help="--resume names a state in the repository: <repo_id>/<path in repo>[:revision[:repo type]]",
    )
    hub.add_argument("--async_upload", action="store_true", help="upload in the background while training goes on")
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
    sampling.add_argument(
        "--sample_with_ema",
        action="store_true",
        help="make the samples with the EMA weights (--ema_decay) once the average has started",
    )
    sampling.add_argument(
        "--sample_expand_prompt",
        action="store_true",
        help="expand the sample prompts with Qwen as generation does by default (with --trigger_word before "
        "them); without it samples use the prompts as typed, so they compare step to step",
    )
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
    out.add_argument("--log_tracker_config", help="TOML: init arguments per tracker ([wandb] ...)")
    out.add_argument("--log_prefix", help="prefix of the run folder name under --logging_dir")
    out.add_argument("--log_config", action="store_true", help="log every option of the run to the trackers' config")
    add_notice_options(p, TRAINING_NOTICES, "musubi-tuner options with no effect here")
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


def arguments(argv=None) -> argparse.Namespace:
    """The options as training reads them, with every command-line check done (an error exits)."""
    p = parser()
    first, _ = p.parse_known_args(argv)
    if first.config_file:
        p.set_defaults(**read_config_file(first.config_file, p))
    args = p.parse_args(argv)
    announce_notices(args, TRAINING_NOTICES)
    check_vae_tiling(p, args)
    args.given_options = given_options(p, argv) if args.vram else set()
    if args.flow_shift is not None and args.scheduler_scale is None:
        args.scheduler_scale = args.flow_shift
    if args.full_bf16 and args.full_fp16:
        p.error("--full_bf16 and --full_fp16 exclude each other")
    try:
        fill_from_comfy(args, args.task, ("dit", "vae", "text_encoder_qwen", "text_encoder_clip"))
    except ValueError as error:
        sys.exit(f"error: {error}")
    for name in ("dataset_config", "dit", "output_dir"):
        if not getattr(args, name):
            p.error(f"--{name} is required (on the command line or in --config_file)")
    if args.first_last_probability != 1.0 and args.i2v_mode != "first_last":
        p.error("--first_last_probability needs --i2v_mode first_last")
    try:
        check_network_args(args.network_module, args.network_args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    if not args.ema_decay:
        defaults = {"ema_start_step": 0, "ema_update_every": 1, "ema_device": "training"}
        given = [f"--{name}" for name, default in defaults.items() if getattr(args, name) != default]
        given = ["--sample_with_ema"] * args.sample_with_ema + given
        if given:
            p.error(f"{', '.join(given)} need --ema_decay")
    if args.min_timestep >= args.max_timestep:  # each is in range by its type; together they must make one
        sys.exit(
            f"error: need 0 <= --min_timestep < --max_timestep, got {args.min_timestep:g} and {args.max_timestep:g}"
        )
    try:  # training's first checks, before the models' code is imported (seconds of start-up)
        first_checks(args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    return args


def check(argv=None) -> None:
    """What a run would refuse before loading a model (options, paths, caches), without training: the web
    UI calls it before it launches a run, so its messages are this script's."""
    args = arguments(argv)
    from kandinsky5.training.train import preflight  # the models' code, once the options are known

    try:
        preflight(args)
    except ValueError as error:
        sys.exit(f"error: {error}")


def main(argv=None) -> None:
    args = arguments(argv)
    from kandinsky5.training.train import TrainingInterrupted, train  # the models' code, once the options are known

    try:
        final = train(args)
    except ValueError as error:
        sys.exit(f"error: {error}")
    except TrainingInterrupted as stopped:
        if int(os.environ.get("RANK", "0")) == 0:  # every process stops; the first one says so
            print(stopped, file=sys.stderr)
        # Under torchrun's agent (several processes) a process ending non-zero is a failure it reports with a
        # traceback; a stop that saved its state is not one. When the agent was interrupted too (a terminal's
        # Ctrl-C reaches every process), it ends with 130 itself.
        several = os.environ.get("TORCHELASTIC_RUN_ID") and int(os.environ.get("WORLD_SIZE", "1")) > 1
        sys.exit(0 if several else 130)
    print(f"done: {final}")


if __name__ == "__main__":
    main()
