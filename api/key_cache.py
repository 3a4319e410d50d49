"""The API process's cache of authenticated keys: most requests then authenticate with no query.

It lives in the API, not in core.tenants: only the API's request authentication reads it, and a
revocation made elsewhere (the CLI, another API process) reaches it by its time-to-live."""

from __future__ import annotations

import time

from core.models import ApiKey


class KeyCache:
    """Live API keys by hash, in this process, each for a few seconds after its lookup: a
    request with a known key then needs no query and no thread of its own to authenticate.

    Entries are found by the full hash of the presented key, so a key only ever finds its own
    row (and so its own tenant). Unknown and revoked keys are not kept: each such request still
    asks the database. The keys are detached from any session, so that one request's rollback
    cannot expire a key another request reads."""

    MAX_ENTRIES = 10_000  # far more live keys than a deployment has; bounds what floods can add

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, ApiKey]] = {}
        # Bumped by every forget: a lookup that began before a revocation (and may have read the
        # key unrevoked) must not put it back afterwards.
        self.generation = 0

    def get(self, key_hash: str) -> ApiKey | None:
        entry = self._entries.get(key_hash)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            self._entries.pop(key_hash, None)
            return None
        return entry[1]

    def put(self, key_hash: str, key: ApiKey, ttl_seconds: float, generation: int) -> None:
        """Keep ``key`` unless a key was forgotten since ``generation`` (read before the lookup)."""
        if ttl_seconds <= 0 or generation != self.generation:
            return
        if len(self._entries) >= self.MAX_ENTRIES:
            self._entries.clear()
        self._entries[key_hash] = (time.monotonic() + ttl_seconds, key)

    def forget(self, key_id: str) -> None:
        self.generation += 1
        for key_hash, (_, key) in list(self._entries.items()):
            if key.id == key_id:
                self._entries.pop(key_hash, None)

    def clear(self) -> None:
        self._entries.clear()


API_KEYS = KeyCache()
