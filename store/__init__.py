"""kyara's persistence layer: a LanceDB store of sessions, messages, judgments, runs,
variants, knowledge and (schema version 2) the human feedback: labels, preferences,
alternatives and edits. Knows nothing of models or screens.

    from store import Store, new_id, quote
    store = Store.open(path)            # the caller resolves path; default $KYARA_HOME/store
    store.upsert("sessions", [{"id": new_id(), "persona": "aoi"}])
    store.rows("messages", where=f"session_id = {quote(sid)}", order_by="seq")
"""

from store.errors import StoreError
from store.migrations import MIGRATIONS, SCHEMA_VERSION
from store.sql import quote, quote_list
from store.store import Store, new_id, utcnow

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Store",
    "StoreError",
    "new_id",
    "quote",
    "quote_list",
    "utcnow",
]
