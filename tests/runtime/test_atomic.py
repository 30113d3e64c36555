"""Atomic output folders: refused targets stay untouched, a failed swap keeps the old
output, and debris of killed runs is swept (SIGTERM cleans up at once)."""
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from vispec.runtime import atomic
from vispec.runtime.atomic import MARKER, atomic_output_dir
from vispec.runtime.errors import VispecError
from vispec.runtime.manifest import MANIFEST_NAME


def write(folder, name="a.txt", text="old"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder


def ours(folder, text="old"):
    write(folder, text=text)
    (folder / MARKER).write_text("")
    return folder


def produce(out, overwrite=False, inputs=()):
    with atomic_output_dir(out, overwrite, inputs=inputs) as tmp:
        (tmp / "a.txt").write_text("new")


def test_new_output_is_marked_and_leaves_no_temporaries(tmp_path):
    produce(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_output_with_a_manifest_needs_no_marker(tmp_path):
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / MANIFEST_NAME).write_text("{}")
    assert [p.name for p in (tmp_path / "out").iterdir()] == [MANIFEST_NAME]
    produce(tmp_path / "out", overwrite=True)  # recognised as ours


def test_overwrite_replaces_an_earlier_output(tmp_path):
    ours(tmp_path / "out")
    produce(tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "a.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("target", [".", "..", "sub/.."])
def test_current_folder_and_its_parents_are_refused(tmp_path, monkeypatch, target):
    cwd = ours(tmp_path / "work")
    write(cwd / "sub")
    monkeypatch.chdir(cwd)
    with pytest.raises(VispecError, match="current folder or one above it"):
        produce(target, overwrite=True)
    assert (cwd / "a.txt").read_text() == "old" and (cwd / "sub" / "a.txt").exists()


@pytest.mark.parametrize("target", ["model", "model/onnx", "."])
def test_outputs_overlapping_an_input_are_refused(tmp_path, monkeypatch, target):
    model = ours(tmp_path / "root" / "model")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VispecError, match="overlaps the input"):
        produce(tmp_path / "root" / target, overwrite=True, inputs=[model])
    assert (model / "a.txt").read_text() == "old"
    assert sorted(p.name for p in model.iterdir()) == [MARKER, "a.txt"]


def test_a_folder_not_written_by_us_is_never_replaced(tmp_path):
    user = write(tmp_path / "photos")
    with pytest.raises(VispecError, match="not written by vispec-export"):
        produce(user, overwrite=True)
    assert (user / "a.txt").read_text() == "old"


def test_existing_output_needs_overwrite(tmp_path):
    ours(tmp_path / "out")
    with pytest.raises(VispecError, match="already exists.*--overwrite"):
        produce(tmp_path / "out")


def test_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(VispecError, match="is a file"):
        produce(tmp_path / "f" / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


def test_failed_swap_keeps_the_old_output(tmp_path, monkeypatch):
    out = ours(tmp_path / "out")
    real = os.replace

    def replace(src, dst):
        if ".partial-" in os.fspath(src):  # moving the new output into place fails
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        produce(out, overwrite=True)
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_error_inside_leaves_the_old_output(tmp_path):
    out = ours(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("export failed")
    assert (out / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_debris_of_dead_runs_is_swept(tmp_path):
    pid = dead_pid()
    write(tmp_path / f".out.partial-{pid}-abc123")
    write(tmp_path / f".out.old-{pid}-deadbeef")
    write(tmp_path / f".other.partial-{pid}-abc")  # another output's
    live = write(tmp_path / f".out.partial-{os.getpid()}-xyz")  # a run in progress
    live_other = write(tmp_path / f".other.partial-{os.getpid()}-uvw")
    ours(tmp_path / "out")
    produce(tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, live_other.name,
                                                                 "out"])


def test_any_output_sweeps_the_debris_of_dead_runs_beside_it(tmp_path):
    pid = dead_pid()
    write(tmp_path / f".export.partial-{pid}-abc123")  # a killed `export` to another name
    (tmp_path / f".export.old-{pid}-0a1b2c3d").mkdir()  # its swap cut short
    (tmp_path / "export").mkdir()  # ... after the new output was in place
    produce(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "out"]


def test_an_interrupted_swap_puts_the_old_output_back(tmp_path):
    old = ours(tmp_path / f".out.old-{dead_pid()}-0a1b2c3d")
    with pytest.raises(VispecError, match="already exists"):
        produce(tmp_path / "out")
    assert (tmp_path / "out" / "a.txt").read_text() == "old" and not old.exists()


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask, folder, file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_outputs_follow_the_umask(tmp_path, umask, folder, file):
    """mkdtemp makes the output folder 0700 and safetensors writes 0600 files; once in place,
    both are as readable as the umask lets any file be."""
    old = os.umask(umask)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "weights").mkdir()
            save_file({"w": np.zeros(4, np.float32)}, str(tmp / "weights" / "model.safetensors"))
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert mode(out / "weights" / "model.safetensors") == file and mode(out / MARKER) == file
    assert mode(out) == folder and mode(out / "weights") == folder


def test_an_output_in_a_read_only_folder_is_refused_up_front(read_only_dir):
    with pytest.raises(VispecError, match="not writable.*Hint:"):
        produce(read_only_dir / "out")
    assert list(read_only_dir.iterdir()) == []
