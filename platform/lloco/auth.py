"""API keys: which tenant a caller is, or whether it holds the admin key.

A tenant key is ``lloco_`` + 32 random bytes (urlsafe base64). Only its sha256 is stored, so a
leaked bucket yields no usable keys; looking a key up by its hash reveals nothing through timing.
A key is bound to its tenant's uid, so it dies with the tenant even if the name is created again.
The admin key comes from settings and is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import SecretStr

from lloco.errors import NotFound, Unauthenticated
from lloco.logs import get_logger
from lloco.registry import Tenants
from lloco.storage import ObjectStore, keys

log = get_logger(__name__)

KEY_PREFIX = "lloco_"
_KEY_BYTES = 32


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant (``admin`` False) or the administrator (``tenant`` None)."""

    tenant: str | None
    admin: bool


class KeyRing:
    """Creates, resolves and revokes API keys stored (as hashes) in the object store."""

    def __init__(self, store: ObjectStore, admin_key: SecretStr | None) -> None:
        self._store = store
        self._tenants = Tenants(store)
        admin = admin_key.get_secret_value() if admin_key is not None else ""
        self._admin_key = admin.encode("utf-8") if admin else None

    def create_key(self, tenant: str) -> str:
        """A new key for ``tenant``; the plaintext is returned here once and never stored."""
        tenant_uid = self._tenants.uid(tenant)
        if tenant_uid is None:
            raise NotFound(f"tenant {tenant!r} not found")
        key = KEY_PREFIX + secrets.token_urlsafe(_KEY_BYTES)
        record = {
            "tenant": tenant,
            "tenant_uid": tenant_uid,
            "created": datetime.now(UTC).isoformat(),
            "hint": key[: len(KEY_PREFIX) + 4],
        }
        self._store.put_bytes(keys.api_key(_hash(key)), json.dumps(record).encode(), "application/json")
        log.info("api key created", tenant=tenant, hint=record["hint"])
        return key

    def resolve(self, key: str) -> Principal:
        """The principal holding ``key``; Unauthenticated for a missing, unknown or revoked key."""
        if not key:
            raise Unauthenticated("missing API key")
        if self._admin_key is not None and hmac.compare_digest(key.encode("utf-8"), self._admin_key):
            return Principal(tenant=None, admin=True)
        record = self._record(key)
        if record is None:
            raise Unauthenticated("unknown or revoked API key")
        if self._tenants.uid(record["tenant"]) != record["tenant_uid"]:
            raise Unauthenticated("the API key's tenant no longer exists")
        return Principal(tenant=record["tenant"], admin=False)

    def revoke(self, key: str) -> None:
        """Make ``key`` unusable at once; NotFound if it is not a live key."""
        if self._record(key) is None:
            raise NotFound("unknown or already revoked API key")
        self._store.delete(keys.api_key(_hash(key)))
        log.info("api key revoked", hint=key[: len(KEY_PREFIX) + 4])

    def _record(self, key: str) -> dict[str, str] | None:
        if not key.startswith(KEY_PREFIX):
            return None
        try:
            return json.loads(self._store.get_bytes(keys.api_key(_hash(key))))
        except NotFound:
            return None


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
