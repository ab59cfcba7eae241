"""Private files are born with their final mode and replaced atomically; directories are 0700."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from baton import private


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_a_private_file_is_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        private.write_file(tmp_path / "secret", "s3cret")
        directory = private.make_dir(tmp_path / "dir")
        with private.open_log(tmp_path / "dir" / "a.log") as log:
            log.write(b"line\n")
    finally:
        os.umask(old)
    assert (tmp_path / "secret").read_text() == "s3cret"
    assert _mode(tmp_path / "secret") == 0o600
    assert _mode(directory) == 0o700
    assert _mode(tmp_path / "dir" / "a.log") == 0o600


def test_replacing_a_private_file_leaves_no_temporary_and_tightens_nothing_else(
    tmp_path: Path,
) -> None:
    target = tmp_path / "endpoints.json"
    target.write_text("old")
    target.chmod(0o644)  # what an older baton wrote
    private.write_file(target, "new")
    assert target.read_text() == "new"
    assert _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["endpoints.json"]


def test_existing_directories_and_logs_of_an_older_baton_are_tightened(tmp_path: Path) -> None:
    old_dir = tmp_path / "logs"
    old_dir.mkdir(mode=0o755)
    old_dir.chmod(0o755)
    old_log = old_dir / "nats.log"
    old_log.write_text("kept\n")
    old_log.chmod(0o644)
    private.make_dir(old_dir)
    with private.open_log(old_log) as log:
        log.write(b"appended\n")
    assert _mode(old_dir) == 0o700
    assert _mode(old_log) == 0o600
    assert old_log.read_text() == "kept\nappended\n"


def test_a_symlink_in_place_of_a_log_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("")
    (tmp_path / "x.log").symlink_to(victim)
    with pytest.raises(OSError):
        private.open_log(tmp_path / "x.log")
