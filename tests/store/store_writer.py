"""A writer process for the store's multi-process tests (run as a script, not collected).

    python store_writer.py STORE COUNT unique|shared [START_FILE]

Opens the store, prints "ready", waits until START_FILE exists (so several writers can be
released together), then upserts COUNT sessions rows, one per call, and prints each id only
after its upsert returned — a printed id is an acknowledged (committed) write.
"unique" ids are fresh per row; "shared" ids are the same COUNT ids in every writer.
"""

import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from store import Store, new_id


def main() -> None:
    path, count, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    start_file = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    store = Store.open(path)
    print("ready", flush=True)
    if start_file is not None:
        deadline = time.monotonic() + 60
        while not start_file.exists():
            if time.monotonic() > deadline:
                sys.exit("start file never appeared")
            time.sleep(0.002)
    for k in range(count):
        row_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"kyara-test/{k}")) if mode == "shared" \
            else new_id()
        store.upsert("sessions", [{"id": row_id, "persona": f"writer-{os.getpid()}",
                                   "title": f"row {k}"}])
        print(row_id, flush=True)


if __name__ == "__main__":
    main()
