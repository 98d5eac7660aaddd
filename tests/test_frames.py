import pytest

from dataset.config import DatasetConfig
from dataset.frames import VideoReadError, clips, read_frames

from .media_factory import write_gif, write_image, write_video


def config(**values):
    return DatasetConfig(index=0, kind="video", directory=None, jsonl_file=None, cache_directory=None, **values)


@pytest.mark.parametrize(
    "values,count,expected",
    [
        (dict(target_frames=[5, 9]), 20, [(0, 5), (0, 9)]),
        (dict(target_frames=[5, 25]), 20, [(0, 5)]),  # too short for 25
        (dict(target_frames=[5], frame_extraction="chunk"), 17, [(0, 5), (5, 5), (10, 5)]),
        (dict(target_frames=[5], frame_extraction="slide", frame_stride=4), 17, [(0, 5), (4, 5), (8, 5), (12, 5)]),
        (dict(target_frames=[9], frame_extraction="uniform", frame_sample=3), 21, [(0, 9), (6, 9), (12, 9)]),
        (dict(frame_extraction="full", max_frames=129), 20, [(0, 17)]),
        (dict(frame_extraction="full", max_frames=9), 20, [(0, 9)]),
    ],
)
def test_extraction_modes(values, count, expected):
    assert clips(count, config(**values)) == expected


def test_videos_in_several_codecs_gifs_and_frame_folders_decode(tmp_path):
    mp4 = write_video(tmp_path / "a.mp4", 12, 70, 54)
    webm = write_video(tmp_path / "b.webm", 9, 64, 48, codec="libvpx-vp9")
    odd = write_video(tmp_path / "c.mkv", 7, 33, 21, codec="ffv1", pix_fmt="yuv444p")
    gif = write_gif(tmp_path / "d.gif", 6, 40, 30)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(5):
        write_image(folder / f"{i:03d}.png", 20, 16, seed=i)
    expected = {mp4: (12, (70, 54)), webm: (9, (64, 48)), odd: (7, (33, 21)), gif: (6, (40, 30)), folder: (5, (20, 16))}
    for path, (count, size) in expected.items():
        images = read_frames(path)
        assert len(images) == count and images[0].size == size, path
    assert len(read_frames(mp4, limit=5)) == 5


def test_source_fps_resamples_to_24(tmp_path):
    video = write_video(tmp_path / "v.mp4", 30, 32, 32, fps=30)
    assert len(read_frames(video, source_fps=30.0)) == 24  # one frame in five dropped
    slow = write_video(tmp_path / "s.mp4", 12, 32, 32, fps=12)
    assert len(read_frames(slow, source_fps=12.0)) == 23  # frames repeated, none skipped


def test_broken_videos_raise_a_named_error(tmp_path):
    video = write_video(tmp_path / "v.mp4", 12, 32, 32)
    truncated = tmp_path / "t.mp4"
    truncated.write_bytes(video.read_bytes()[: len(video.read_bytes()) // 3])
    with pytest.raises(VideoReadError, match="t.mp4"):
        read_frames(truncated)
