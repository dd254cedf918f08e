import os
import stat
from pathlib import Path

import pytest

from runtime.artifacts import atomic_dir


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_dir_swaps_in_a_complete_folder_and_keeps_the_old_one_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert names(out) == ["new.txt"] and names(tmp_path) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700

    with pytest.raises(RuntimeError, match="build failed"):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("build failed")
    assert names(out) == ["new.txt"] and names(tmp_path) == ["out"]

    real_replace = os.replace

    def swap_fails(src, dst):
        if str(src).endswith(".tmp"):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", swap_fails)
    with pytest.raises(OSError, match="disk gone"):
        with atomic_dir(out) as tmp:
            (tmp / "newer.txt").write_text("newer")
    assert names(out) == ["new.txt"] and names(tmp_path) == ["out"]  # the previous folder was put back


def test_atomic_dir_creates_a_missing_folder(tmp_path):
    with atomic_dir(tmp_path / "a" / "b") as tmp:
        (tmp / "f").write_text("x")
    assert names(tmp_path / "a" / "b") == ["f"]


def test_one_temp_then_rename_writer():
    """Every file either side writes goes through runtime/artifacts.py (atomic_path / atomic_dir)."""
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    writers = [p.relative_to(root).as_posix() for d in ("runtime", "export", "sglora_edge") for p in (root / d).rglob("*.py")
               if re.search(r"os\.replace\(|\.replace\(\s*(root|path|dst|out)|mkstemp\(|mkdtemp\(", p.read_text())]
    assert writers == ["runtime/artifacts.py"], writers
