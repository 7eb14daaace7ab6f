"""Videos people watch: `write_video` (arrays or streamed chunks, mp4 and gif) and `wm video` over a dataset."""

import imageio.v2 as imageio
import numpy as np
import pytest

from conftest import swallow_a_stop, write_swm_file, write_synthetic
from envs.dataset import EpisodeStore
from envs.video import write_video
from wm import main


def test_a_streamed_video_is_the_video_of_the_whole_array(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (9, 32, 32, 3), dtype=np.uint8)
    whole = write_video(tmp_path / "whole.mp4", frames, gif=True)
    parts = write_video(tmp_path / "parts.mp4", (frames[i:i + 4] for i in range(0, 9, 4)), gif=True)
    assert [p.name for p in parts] == ["parts.mp4", "parts.gif"]
    for a, b in zip(whole, parts):
        assert np.array_equal(np.stack(imageio.mimread(a)), np.stack(imageio.mimread(b)))
    assert len(imageio.mimread(parts[0])) == 9 and len(imageio.mimread(parts[1])) == 5  # the gif: every 2nd
    with pytest.raises(ValueError, match="no frames to write"):
        write_video(tmp_path / "none.mp4", iter([]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parts.gif", "parts.mp4", "whole.gif", "whole.mp4"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed stop, on purpose
def test_a_stop_swallowed_where_python_ignores_exceptions_still_stops_the_command(tmp_path):
    """SIGTERM arriving while ffmpeg starts lands in an at-fork hook, where Python ignores the exception: the
    next video is not written, and a command whose block ends anyway ends interrupted, not finished. A stop
    of an earlier command does not stop a later one."""
    from common.process import raise_if_stopped, sigterm_as_interrupt

    frames = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            swallow_a_stop()
            write_video(tmp_path / "after.mp4", frames)
    assert not (tmp_path / "after.mp4").exists()
    with pytest.raises(KeyboardInterrupt):
        with sigterm_as_interrupt():
            swallow_a_stop()
    from common.files import KeptRuns

    with pytest.raises(KeyboardInterrupt):  # a long job's next part is not begun either
        with sigterm_as_interrupt():
            swallow_a_stop()
            KeptRuns(None, {}, "").run("part", lambda: pytest.fail("a part began after the stop"))
    with sigterm_as_interrupt():  # the next command starts afresh
        raise_if_stopped()
        write_video(tmp_path / "next.mp4", frames)
    raise_if_stopped()  # outside any command: no stale stop
    assert (tmp_path / "next.mp4").exists()


def test_a_swallowed_stop_prints_no_traceback(monkeypatch):
    """Python reports the KeyboardInterrupt it swallowed as "Exception ignored ... Traceback" on stderr, which
    read as a crash beside "wm convert: interrupted"; any other unraisable exception is still reported."""
    import sys
    from types import SimpleNamespace

    from common.process import sigterm_as_interrupt

    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_type))
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        swallow_a_stop()
        sys.unraisablehook(SimpleNamespace(exc_type=ValueError))
    assert reported == [ValueError]
    sys.unraisablehook(SimpleNamespace(exc_type=KeyboardInterrupt))  # the command's hook back in place after it
    assert reported == [ValueError, KeyboardInterrupt]


def test_wm_video_shows_the_episodes_asked_for(tmp_path, capsys, caplog):
    data = write_synthetic(tmp_path / "d", n_episodes=3, steps=10)
    assert main(["video", "--data", str(data), "--episodes", "2", "--out", str(tmp_path / "two.mp4")]) == 0
    assert "two.mp4 (2 episodes)" in capsys.readouterr().out
    assert len(imageio.mimread(tmp_path / "two.mp4")) == 2 * 11
    assert main(["video", "--data", str(data), "--episodes", "9", "--out", str(tmp_path / "all.mp4")]) == 0
    assert "holds 3 episodes; showing all of them" in caplog.text
    assert len(imageio.mimread(tmp_path / "all.mp4")) == sum(EpisodeStore(data).episodes[i].steps + 1 for i in range(3))
    for option in ("--episodes", "--fps"):
        assert main(["video", "--data", str(data), option, "0", "--out", str(tmp_path / "x.mp4")]) == 2
        assert f"{option} 0 (must be >= 1)" in capsys.readouterr().err
    assert main(["video", "--data", str(tmp_path / "none" / "sub" / "data")]) == 2  # no data: no folders left
    assert not (tmp_path / "none").exists()


def test_wm_video_films_frames_that_are_not_square_at_an_image_size(tmp_path, capsys):
    """Such frames need --image-size, which the error asked for but wm video did not take."""
    frames = np.zeros((4, 24, 32, 3), np.uint8)
    data = write_swm_file(tmp_path / "d.h5", n_episodes=1, rows=4, columns={"pixels": frames})
    out = ["--data", str(data), "--out", str(tmp_path / "v.mp4")]
    assert main(["video", *out]) == 2
    assert "(not square); give --image-size" in capsys.readouterr().err
    assert main(["video", *out, "--image-size", "2"]) == 2
    assert "--image-size (image_size) must be an integer in [8, 4096], got 2" in capsys.readouterr().err
    assert main(["video", *out, "--image-size", "16"]) == 0
    assert len(imageio.mimread(tmp_path / "v.mp4")) == 4
