"""Shared test fixtures.

The benchmark tests read the real annotation files, which ship in the
repository's datasets/ (datasets/README.md): the `annotation_dir` fixture is
$TCA_ANNOTATION_DIR where set, else datasets/. A test that needs them and does
not find them fails with a line naming the folder. pytest.ini puts the project's flat modules on sys.path.
"""
import os
import subprocess

import pytest

# the evaluation tests' mini FIVR-format benchmark and TCA checkpoint, shared by two test modules
from evaluation_helpers import mini, tca_checkpoint  # noqa: F401 (fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ANNOTATION_DIR = os.environ.get("TCA_ANNOTATION_DIR") or os.path.join(REPO, "datasets")


@pytest.fixture(scope="session")
def annotation_dir():
    """The folder of the real annotation files (fivr.pickle, ...)."""
    if not os.path.isfile(os.path.join(_ANNOTATION_DIR, "fivr.pickle")):
        pytest.fail(f"the real annotation files are not in {_ANNOTATION_DIR}: run python datasets/download.py, or "
                    "set TCA_ANNOTATION_DIR to the folder holding fivr.pickle, cc_web_video.pickle, evve.pickle, "
                    "vcdb.pickle", pytrace=False)
    return _ANNOTATION_DIR


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 512 KiB tmpfs, to run out of disk space for real (needs root, as CI
    runs); its remount_ro() makes it read-only."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("this machine does not let root mount a tmpfs")

    class Mount(type(mount)):
        def remount_ro(self):
            subprocess.run(["mount", "-o", "remount,ro", str(self)], check=True)

        def fill(self, leave=0):
            """Fill the disk with a file 'filler', leaving about `leave` bytes."""
            with open(self / "filler", "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 4096)
                except OSError:  # ENOSPC
                    pass
            if leave:
                os.truncate(self / "filler", max(0, os.path.getsize(self / "filler") - leave))
    try:
        yield Mount(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)])
