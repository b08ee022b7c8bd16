"""Metaflow cards stored where the Metaflow client and the UI backend read them.

With the local datastore, Metaflow 2.19 writes a task's cards under the `.metaflow/mf.cards` nearest the
working directory and drops METAFLOW_CARD_LOCALROOT, while `metaflow.cards.get_cards` and the UI backend
(metaflow-service) read them from `<the task's datastore root>/mf.cards`. The two differ as soon as
METAFLOW_DATASTORE_SYSROOT_LOCAL points elsewhere than the working directory, and the cards are lost to
both readers (Netflix/metaflow#2139). `keep_cards_with_datastore()` makes the writer use the readers'
place; a flow calls it at import, so Metaflow's card subprocess (which imports the flow file) does too.
"""

from __future__ import annotations

import os
from typing import Any


def local_card_root() -> str | None:
    """Where local cards belong: METAFLOW_CARD_LOCALROOT when set, else `<local datastore root>/mf.cards`;
    None before Metaflow has resolved its local datastore root."""
    from metaflow.metaflow_config import CARD_LOCALROOT, CARD_SUFFIX
    from metaflow.plugins.datastores.local_storage import LocalStorage

    if CARD_LOCALROOT:
        return str(CARD_LOCALROOT)
    root = LocalStorage.datastore_root
    return os.path.join(root, CARD_SUFFIX) if root else None


def keep_cards_with_datastore() -> None:
    """Make Metaflow write local cards under `local_card_root()`; other datastores are left as they are."""
    from metaflow.plugins.cards.card_datastore import CardDatastore

    original = CardDatastore.get_storage_root
    if getattr(original, "keeps_cards_with_datastore", False):
        return

    def get_storage_root(cls: Any, storage_type: str) -> str | None:
        root = local_card_root() if storage_type == "local" else None
        return root or original(storage_type)

    get_storage_root.keeps_cards_with_datastore = True  # type: ignore[attr-defined]
    CardDatastore.get_storage_root = classmethod(get_storage_root)  # type: ignore[method-assign,assignment]
