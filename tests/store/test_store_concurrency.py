"""Several processes writing one store at once, and a writer killed mid-stream."""

import os
import signal
import subprocess
import sys

import pytest

from store import SCHEMA_VERSION, Store, StoreError, new_id

WRITERS, WRITES = 4, 50


def _run_released_together(store_path, start_file, writer, mode):
    """Start WRITERS processes on a store none of them has created yet, wait until each
    has opened it, release them at once, and return every acknowledged id."""
    procs = [writer(store_path, WRITES, mode, start_file) for _ in range(WRITERS)]
    try:
        for proc in procs:
            line = proc.stdout.readline()
            assert line.strip() == "ready", proc.stderr.read() if not line else line
        start_file.touch()
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    return [line for out, _ in outputs for line in out.split()]


def test_writers_with_distinct_ids_lose_nothing(tmp_path, writer):
    acked = _run_released_together(tmp_path / "store", tmp_path / "go", writer, "unique")
    assert len(acked) == len(set(acked)) == WRITERS * WRITES

    store = Store.open(tmp_path / "store")
    ids = [row["id"] for row in store.rows("sessions")]
    assert store.count("sessions") == len(ids) == WRITERS * WRITES
    assert set(ids) == set(acked)
    assert store.schema_version == SCHEMA_VERSION  # concurrent first opens migrated once
    assert store.count("meta") == 1


def test_writers_upserting_the_same_ids_leave_one_row_each(tmp_path, writer):
    # Without the store's write lock lance keeps duplicates here (4 x 50 gave 53 rows).
    acked = _run_released_together(tmp_path / "store", tmp_path / "go", writer, "shared")
    assert len(acked) == WRITERS * WRITES and len(set(acked)) == WRITES

    store = Store.open(tmp_path / "store")
    ids = [row["id"] for row in store.rows("sessions")]
    assert len(ids) == store.count("sessions") == WRITES
    assert set(ids) == set(acked)


def test_acknowledged_writes_survive_sigkill(tmp_path, writer):
    path = tmp_path / "store"
    acked: list[str] = []
    for round_ in range(3):  # kill several writers in turn into the same store
        proc = writer(path, 100_000, "unique")
        try:
            assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
            target = len(acked) + 10 + round_
            while len(acked) < target:
                line = proc.stdout.readline()
                assert line, f"writer died: {proc.stderr.read()}"
                acked.append(line.strip())
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        acked.extend(proc.stdout.read().split())  # printed before the kill landed

    store = Store.open(path, lock_timeout=5)
    stored = {row["id"] for row in store.rows("sessions")}
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged writes lost"
    # at most one write per killed writer was committed but not yet acknowledged
    assert len(stored) <= len(acked) + 3
    # the killed writers' locks died with them: writing works at once
    store.upsert("sessions", [{"id": new_id(), "persona": "after"}])
    assert store.count("sessions") == len(stored) + 1


def test_a_held_lock_makes_writes_wait_then_fail_clearly(tmp_path, user_error):
    store = Store.open(tmp_path / "store", lock_timeout=0.3)
    hold = ("import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(store.path / ".kyara-store.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StoreError) as caught:
            store.upsert("sessions", [{"id": new_id(), "persona": "p"}])
        user_error(caught.value, store.path, "busy", "write lock")
        assert store.count("sessions") == 0  # reads need no lock
    finally:
        holder.kill()
        holder.wait()
    store.upsert("sessions", [{"id": new_id(), "persona": "p"}])
    assert store.count("sessions") == 1
