"""Fixtures shared by the store tests."""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from store import StoreError

WRITER = Path(__file__).resolve().parent / "store_writer.py"


def assert_user_error(err: StoreError, path: Path, *words: str) -> None:
    """What a user sees: one line naming the store path and the problem, not a traceback."""
    message = str(err)
    assert "\n" not in message, f"not one line: {message!r}"
    assert message.startswith(f"store at {path} "), message
    assert "Traceback" not in message and ".rs:" not in message, message
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"


@pytest.fixture
def user_error():
    return assert_user_error


def start_writer(store_path: Path, count: int, mode: str, start_file: Path | None = None,
                 **popen) -> subprocess.Popen:
    args = [sys.executable, str(WRITER), str(store_path), str(count), mode]
    if start_file is not None:
        args.append(str(start_file))
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


@pytest.fixture
def writer():
    return start_writer


@pytest.fixture
def tmpfs(tmp_path):
    """Mount small tmpfs file systems under tmp_path (needs root); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str, name: str = "mnt") -> Path:
        target = tmp_path / name
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755",
                               "tmpfs", str(target)], check=False, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(target)
        return target

    def remount_read_only(target: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)

    yield SimpleNamespace(mount=mount, remount_read_only=remount_read_only)
    for target in reversed(mounted):
        if subprocess.run(["umount", str(target)], check=False, capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], check=True)
