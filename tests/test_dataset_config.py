import json

import pytest

from dataset.config import DatasetConfigError, load_dataset_config

from .acceptance import SPEC_DATASET


def write(tmp_path, text, name="d.toml"):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "videos").mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(text.replace("ROOT", str(tmp_path)))
    return path


SPEC_EXAMPLE = SPEC_DATASET.replace("path/to", "ROOT")


def test_the_spec_example_loads(tmp_path):
    images, videos = load_dataset_config(write(tmp_path, SPEC_EXAMPLE))
    assert (images.kind, images.resolution, images.enable_bucket, images.cache_directory.name) == (
        "image",
        (512, 512),
        True,
        "cache",
    )
    assert (videos.kind, videos.resolution, videos.target_frames, videos.frame_extraction) == (
        "video",
        (256, 256),
        [17],
        "head",
    )


def test_a_full_musubi_style_config_loads_with_ints_for_floats(tmp_path):
    config = write(
        tmp_path,
        """
[general]
resolution = 960
caption_extension = ".caption"
batch_size = 2
num_repeats = 3
enable_bucket = true
bucket_no_upscale = true

[[datasets]]
video_directory = "ROOT/videos"
cache_directory = "ROOT/vc"
target_frames = [1, 25, 45]
frame_extraction = "slide"
frame_stride = 10
frame_sample = 4
max_frames = 129
source_fps = 30
""",
    )
    (video,) = load_dataset_config(config)
    assert video.resolution == (960, 960) and video.source_fps == 30.0 and isinstance(video.source_fps, float)
    assert (video.batch_size, video.num_repeats, video.caption_extension) == (2, 3, ".caption")
    assert video.bucket_no_upscale and video.frame_stride == 10 and video.target_frames == [1, 25, 45]


def test_json_configs_load(tmp_path):
    path = tmp_path / "d.json"
    (tmp_path / "images").mkdir()
    path.write_text(json.dumps({"datasets": [{"image_directory": str(tmp_path / "images")}]}))
    (dataset,) = load_dataset_config(path)
    assert dataset.cache_directory == tmp_path / "images" and not dataset.bucket_no_upscale


@pytest.mark.parametrize(
    "body,message",
    [
        (
            '[[datasets]]\nimage_directory = "ROOT/images"\nresolutoin = 512',
            r"d.toml: \[\[datasets\]\] number 1, key 'resolutoin': unknown key",
        ),
        (
            '[general]\ncache_directory = "x"\n[[datasets]]\nimage_directory = "ROOT/images"',
            r"\[general\], key 'cache_directory': unknown key",
        ),
        (
            '[[datasets]]\nimage_directory = "ROOT/images"\nbatch_size = "2"',
            r"number 1, key 'batch_size': expected an integer",
        ),
        (
            '[[datasets]]\nimage_directory = "ROOT/images"\nresolution = [1, 2, 3]',
            r"key 'resolution': expected an integer or a list \[width, height\]",
        ),
        (
            '[[datasets]]\nvideo_directory = "ROOT/videos"\ntarget_frames = [1, 0]',
            r"key 'target_frames': expected a list of positive integers",
        ),
        (
            '[[datasets]]\nvideo_directory = "ROOT/videos"\nframe_extraction = "middle"',
            r"key 'frame_extraction': expected one of head, chunk, slide, uniform, full",
        ),
        ('[[datasets]]\nimage_directory = "ROOT/imagez"', r"number 1: image_directory '.*imagez' does not exist"),
        (
            '[[datasets]]\nimage_directory = "ROOT/images"\n[[datasets]]\nvideo_directory = "ROOT/videos"\n'
            'cache_directory = "ROOT/images"',
            r"datasets number 1 and 2 share the cache_directory",
        ),
        ('[[datasets]]\ncache_directory = "ROOT/c"', r"number 1: give image_directory, image_jsonl_file"),
        ("[[datasets]\n", r"is not valid TOML"),
    ],
)
def test_errors_name_the_file_dataset_key_and_expectation(tmp_path, body, message):
    with pytest.raises(DatasetConfigError, match=message):
        load_dataset_config(write(tmp_path, body))


def test_missing_file_and_wrong_extension(tmp_path):
    with pytest.raises(DatasetConfigError, match="does not exist"):
        load_dataset_config(tmp_path / "none.toml")
    (tmp_path / "d.yaml").write_text("x")
    with pytest.raises(DatasetConfigError, match="must be a .toml or .json file"):
        load_dataset_config(tmp_path / "d.yaml")


def test_keys_of_other_architectures_are_accepted_with_a_note(tmp_path, capsys):
    config = write(tmp_path, '[[datasets]]\nimage_directory = "ROOT/images"\ncontrol_resolution = [512, 512]')
    load_dataset_config(config)
    assert "note: " in capsys.readouterr().err  # a note of ours, not a Python warning with its source line
    config = write(tmp_path, '[[datasets]]\nvideo_directory = "ROOT/videos"\ncontrol_directory = "x"')
    load_dataset_config(config)  # a video dataset has no editing pairs
    assert "'control_directory' has no effect for Kandinsky 5" in capsys.readouterr().err


def test_an_image_dataset_takes_a_control_directory_of_sources(tmp_path):
    (tmp_path / "sources").mkdir()
    (image,) = load_dataset_config(
        write(tmp_path, '[[datasets]]\nimage_directory = "ROOT/images"\ncontrol_directory = "ROOT/sources"')
    )
    assert image.control_directory == tmp_path / "sources"
    with pytest.raises(DatasetConfigError, match="number 1: control_directory '.*nowhere' is not a folder"):
        load_dataset_config(
            write(tmp_path, '[[datasets]]\nimage_directory = "ROOT/images"\ncontrol_directory = "ROOT/nowhere"')
        )


def test_target_frames_not_4k_plus_1_are_rounded_down_with_a_note_as_musubi_does(tmp_path, capsys):
    """musubi-tuner's own example config uses 25 and 79."""
    config = write(tmp_path, '[[datasets]]\nvideo_directory = "ROOT/videos"\ntarget_frames = [25, 79, 76]')
    (video,) = load_dataset_config(config)
    assert video.target_frames == [25, 73, 77]
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 2 and all(line.startswith(f"note: {config}: [[datasets]] number 1: ") for line in notes)
    assert notes[0].endswith("target_frames value 79 is not 4k+1 (1, 5, 9, 13, 17, ...); using 77")


@pytest.mark.parametrize(
    "body, message",
    [
        ('[[datasets]]\nimage_directory = "ROOT/images"\nresolution = 0', "expected sides of 16 to 8192 pixels, got"),
        ('[[datasets]]\nimage_directory = "ROOT/images"\nresolution = [-64, 64]', "sides of 16 to 8192 pixels"),
        ('[[datasets]]\nimage_directory = "ROOT/images"\nresolution = 3', "sides of 16 to 8192 pixels, got \\[3, 3\\]"),
        ('[[datasets]]\nimage_directory = "ROOT/images"\nbatch_size = true', "key 'batch_size': expected an integer"),
        ('[[datasets]]\nimage_directory = "ROOT/images"\nnum_repeats = 0', "key 'num_repeats': expected an integer in"),
        (
            '[[datasets]]\nvideo_directory = "ROOT/videos"\nsource_fps = 1e-9',
            "expected frames per second in \\[1, 1000\\]",
        ),
        ('[[datasets]]\nimage_directory = "ROOT/images"\ncaption_extension = "txt"', "starting with a dot.*'txt'"),
        ('[[datasets]]\nimage_directory = "ROOT/file.txt"', "image_directory '.*file.txt' is a file, not a folder"),
        ('[[datasets]]\nimage_jsonl_file = "ROOT/images"\ncache_directory = "ROOT/c"', "is a folder, not a JSONL"),
        (
            '[[datasets]]\nimage_directory = "ROOT/images"\ncache_directory = "ROOT/file.txt"',
            "cache_directory '.*file.txt' is a file, not a folder",
        ),
    ],
)
def test_out_of_range_values_and_wrong_kinds_of_path_are_named(tmp_path, body, message):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetConfigError, match=message):
        load_dataset_config(write(tmp_path, body))


def test_a_config_that_is_a_folder_or_not_utf8_is_named(tmp_path):
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(DatasetConfigError, match="folder.toml is a folder"):
        load_dataset_config(tmp_path / "folder.toml")
    (tmp_path / "latin1.toml").write_bytes('[[datasets]]\nimage_directory = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(DatasetConfigError, match="latin1.toml is not UTF-8 text"):
        load_dataset_config(tmp_path / "latin1.toml")
