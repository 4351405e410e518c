"""File-system failures a user can cause: read-only, full, not theirs. Each is one line."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from store import Store, StoreError, new_id

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _session(title="t"):
    return {"id": new_id(), "persona": "p", "title": title}


def test_read_only_store_reads_but_refuses_writes_clearly(tmpfs, user_error):
    mount = tmpfs.mount("4m")
    path = mount / "store"
    row = _session()
    Store.open(path).upsert("sessions", [row])
    tmpfs.remount_read_only(mount)

    store = Store.open(path)  # an up-to-date store opens without writing anything
    assert store.get("sessions", row["id"]) == Store.open(path).get("sessions", row["id"])
    with pytest.raises(StoreError) as caught:
        store.upsert("sessions", [_session()])
    user_error(caught.value, path, "read-only", "KYARA_STORE")
    assert caught.value.__cause__ is not None
    assert store.count("sessions") == 1


def test_new_store_on_a_read_only_file_system_fails_to_open(tmpfs, user_error):
    mount = tmpfs.mount("1m")
    tmpfs.remount_read_only(mount)
    with pytest.raises(StoreError) as caught:
        Store.open(mount / "store")
    user_error(caught.value, mount / "store", "read-only", "check permissions")


def test_full_disk_fails_the_write_clearly_and_keeps_what_was_written(tmpfs, user_error):
    path = tmpfs.mount("1m") / "store"
    store = Store.open(path)
    big = "x" * 64 * 1024
    written = 0
    with pytest.raises(StoreError) as caught:
        for _ in range(100):
            store.upsert("sessions", [_session(big)])
            written += 1
    user_error(caught.value, path, "out of disk space", "free some disk space")
    assert written > 0, "the tmpfs was too small to test a write"
    assert store.count("sessions") == written  # the failed write left no partial row
    assert Store.open(path).count("sessions") == written


def test_full_disk_at_first_open_fails_clearly(tmpfs, user_error):
    path = tmpfs.mount("8k") / "store"
    with pytest.raises(StoreError) as caught:
        Store.open(path)
    user_error(caught.value, path, "out of disk space")


def test_store_of_another_user_is_a_permission_error(tmp_path):
    """The store belongs to `nobody`; the opener is root without its capabilities (setpriv),
    so file modes apply to it. (Root ignores modes, so a chmod alone cannot test this.)"""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and util-linux setpriv")
    path = tmp_path / "store"
    Store.open(path).upsert("sessions", [_session()])
    subprocess.run(["chown", "-R", "65534:65534", str(path)], check=True)  # mode stays 0700

    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        from store import Store, StoreError
        try:
            Store.open({str(path)!r}).count("sessions")
        except StoreError as exc:
            print(exc)
    """)
    done = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--",
                           sys.executable, "-c", script],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert "\n" not in message and "Traceback" not in done.stderr, (message, done.stderr)
    assert message.startswith(f"store at {path} "), message
    assert "permission denied" in message and "check permissions" in message, message
