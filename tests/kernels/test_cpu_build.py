"""The C++ kernels' build names sources copied beside it, so checkouts of the same sources share
one build instead of rebuilding it for each checkout's path (git worktrees, linked copies)."""

import os

from moestream.kernels.cpu.build import CSRC, _copy_sources


def test_sources_are_copied_once_and_kept(tmp_path):
    dest = _copy_sources(tmp_path / "csrc")
    names = sorted(p.name for p in CSRC.iterdir())
    assert sorted(p.name for p in dest.iterdir()) == names
    assert all((dest / n).read_bytes() == (CSRC / n).read_bytes() for n in names)
    stamps = {n: (dest / n).stat().st_mtime_ns for n in names}
    os.utime(dest / names[0], ns=(1, 1))  # an unchanged copy keeps its time: ninja sees nothing new
    _copy_sources(tmp_path / "csrc")
    assert (dest / names[0]).stat().st_mtime_ns == 1
    assert all((dest / n).stat().st_mtime_ns == stamps[n] for n in names[1:])


def test_a_changed_source_is_copied_again(tmp_path):
    dest = _copy_sources(tmp_path / "csrc")
    stale = dest / "extension.cpp"
    stale.write_text("// stale")
    _copy_sources(dest)
    assert stale.read_bytes() == (CSRC / "extension.cpp").read_bytes()
