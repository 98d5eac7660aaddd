"""Caption a dataset's images and videos with Qwen2.5-VL, the text encoder Kandinsky 5 already uses.

    python kandinsky5_caption.py --dataset_config data.toml --text_encoder_qwen weights/text_encoder
    python kandinsky5_caption.py --folder data/photos --prefix "zxq style, "

Captions go where the config reads them: <name><caption_extension> beside each file of a directory
dataset, the "caption" field of a JSONL dataset's lines (with --folder: <name>.txt, or
--caption_extension). Items that have a caption keep it unless --overwrite. Qwen is loaded once;
a file that cannot be read is named and the others are captioned; the exit code is 1 if any failed.
"""

import argparse
import sys
from pathlib import Path

import torch

from kandinsky5.cli import add_text_encoder_dtype_argument
from kandinsky5.comfy_models import add_comfy_argument, fill_from_comfy
from kandinsky5.model.dtypes import TEXT_ENCODER_DTYPES
from modules.option_types import POSITIVE_INT, ScriptParser, annotate_ranges, integer, number


def parser() -> argparse.ArgumentParser:
    p = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset_config", help="dataset config (.toml or .json): its images and videos")
    source.add_argument("--folder", help="a folder of images, videos and folders of frames")
    p.add_argument("--caption_extension", default=".txt", help="caption file extension with --folder (default .txt)")
    p.add_argument(
        "--text_encoder_qwen",
        help="Qwen2.5-VL-7B-Instruct: a folder or ComfyUI's single file (default weights/text_encoder)",
    )
    add_comfy_argument(p)
    add_text_encoder_dtype_argument(p)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    text = p.add_argument_group("what Qwen is asked")
    text.add_argument(
        "--prompt",
        help="the instruction ({kind} becomes image or video; default: a caption in the "
        "style of Kandinsky 5's prompts: subject and action, then scene, light, camera, style)",
    )
    text.add_argument("--prompt_file", help="a text file holding the instruction (instead of --prompt)")
    text.add_argument("--prefix", default="", help='text put before every caption, e.g. a trigger word "zxq style, "')
    text.add_argument("--max_new_tokens", type=POSITIVE_INT, default=256, help="longest caption in tokens")
    text.add_argument(
        "--temperature",
        type=number(0, 2),
        default=0.0,
        help="0 (default): greedy, the same captions every run; above 0: sampled, seeded by --seed",
    )
    text.add_argument("--seed", type=integer(0), default=42, help="seed of sampled captions")
    media = p.add_argument_group("what Qwen is shown")
    media.add_argument(
        "--image_max_pixels",
        type=POSITIVE_INT,
        default=768 * 28 * 28,
        help="images are scaled down to at most this many pixels (default 602112)",
    )
    media.add_argument(
        "--video_fps",
        type=number(0, 30, low_open=True),
        default=2.0,
        help="video frames shown per second (default 2, as Qwen2.5-VL samples)",
    )
    media.add_argument("--video_max_frames", type=integer(2, 768), default=32, help="at most this many frames")
    media.add_argument(
        "--video_max_pixels",
        type=POSITIVE_INT,
        default=360 * 420,
        help="pixels per video frame at most (default 151200)",
    )
    run = p.add_argument_group("writing")
    run.add_argument("--batch_size", type=POSITIVE_INT, default=1, help="items captioned together")
    run.add_argument("--skip_existing", action="store_true", help="keep existing captions (the default)")
    run.add_argument("--overwrite", action="store_true", help="replace existing captions")
    return annotate_ranges(p)


def main(argv=None) -> None:
    p = parser()
    args = p.parse_args(argv)
    if args.overwrite and args.skip_existing:
        p.error("--overwrite and --skip_existing exclude each other")
    try:  # every path checked before transformers is imported
        prompt = args.prompt
        if args.prompt_file:
            if args.prompt:
                raise ValueError("give --prompt or --prompt_file, not both")
            prompt = Path(args.prompt_file).read_text(encoding="utf-8").strip()
        from kandinsky5.captioning.caption_job import config_targets, folder_targets

        if args.folder and not Path(args.folder).is_dir():
            raise ValueError(f"--folder {args.folder} is not a folder")
        targets = (
            config_targets(args.dataset_config)
            if args.dataset_config
            else folder_targets(args.folder, args.caption_extension)
        )
        from kandinsky5.model.tasks import get_task

        fill_from_comfy(args, get_task("k5-lite-t2v-5s-sd"), ("text_encoder_qwen",))
        args.text_encoder_qwen = args.text_encoder_qwen or "weights/text_encoder"
        if not Path(args.text_encoder_qwen).exists():
            raise ValueError(
                f"--text_encoder_qwen {args.text_encoder_qwen} does not exist (a Qwen2.5-VL folder or file)"
            )
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    if not targets:
        sys.exit(f"error: no images or videos in {args.dataset_config or args.folder}")

    from kandinsky5.captioning.caption_job import caption_targets
    from kandinsky5.captioning.captioner import Captioner, CaptionSettings
    from kandinsky5.captioning.qwen_vision import VideoSampling
    from kandinsky5.encoders.text_encoders import QwenEncoder, TextEncoderError, lm_head_missing

    missing = lm_head_missing(args.text_encoder_qwen)
    if missing:
        sys.exit(f"error: {missing}")

    fp8 = args.text_encoder_dtype == "fp8"
    dtype = torch.bfloat16 if fp8 else TEXT_ENCODER_DTYPES[args.text_encoder_dtype]
    try:
        qwen = QwenEncoder(args.text_encoder_qwen, args.device, dtype, fp8=fp8)
    except TextEncoderError as error:
        sys.exit(f"error: {error}")
    sampling = VideoSampling(args.video_fps, max_frames=args.video_max_frames, max_pixels=args.video_max_pixels)
    settings = CaptionSettings(
        prompt, args.prefix, args.max_new_tokens, args.temperature, args.seed, args.image_max_pixels, sampling
    )
    summary = caption_targets(Captioner(qwen, settings), targets, args.batch_size, args.overwrite)
    for path, caption in summary.written:
        print(f"{path}: {caption}")
    for path, reason in summary.failed:
        print(f"failed: {path}: {reason}", file=sys.stderr)
    print(summary.line() + ("" if args.overwrite or not summary.kept else " (--overwrite replaces them)"))
    if summary.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
