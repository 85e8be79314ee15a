"""API keys: which tenant a caller is, or whether it holds the admin key.

A tenant key is ``lloco_`` + 32 random bytes (urlsafe base64). Only its sha256 is stored, so a
leaked bucket yields no usable keys; looking a key up by its hash reveals nothing through timing.
A key is bound to its tenant's uid, so it dies with the tenant even if the name is created again.
Each key also has a random id (its resource name is ``tenants/{t}/apiKeys/{id}``), kept in an index
under the tenant's folder: keys are listed and revoked by id, and deleted with their tenant. The
admin key comes from settings and is compared in constant time.
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
class ApiKeyInfo:
    """What is known of a key besides its secret: its id, the first characters (``hint``), its age."""

    tenant: str
    key_id: str
    hint: str
    created: datetime


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant (``admin`` False) or the administrator (``tenant`` None).

    ``tenant_uid`` is the creation uid of the tenant the key was issued for: whoever keeps a principal
    (the edge's key cache) can tell it from a later tenant of the same name.
    """

    tenant: str | None
    admin: bool
    tenant_uid: str | None = None


class KeyRing:
    """Creates, resolves and revokes API keys stored (as hashes) in the object store."""

    def __init__(self, store: ObjectStore, admin_key: SecretStr | None) -> None:
        self._store = store
        self._tenants = Tenants(store)
        admin = admin_key.get_secret_value() if admin_key is not None else ""
        self._admin_key = admin.encode("utf-8") if admin else None

    def create_key(self, tenant: str) -> str:
        """A new key for ``tenant``; the plaintext is returned here once and never stored."""
        return self.issue_key(tenant)[0]

    def issue_key(self, tenant: str) -> tuple[str, ApiKeyInfo]:
        """A new key for ``tenant`` and its info; NotFound if the tenant does not exist.

        The index entry is written before the record that makes the key work, so every working key
        can be listed, revoked by id and deleted with its tenant.
        """
        tenant_uid = self._tenants.uid(tenant)
        if tenant_uid is None:
            raise NotFound(f"tenant {tenant!r} not found")
        key = KEY_PREFIX + secrets.token_urlsafe(_KEY_BYTES)
        info = ApiKeyInfo(
            tenant=tenant,
            key_id=secrets.token_hex(8),
            hint=key[: len(KEY_PREFIX) + 4],
            created=datetime.now(UTC),
        )
        key_hash = _hash(key)
        about = {"hint": info.hint, "created": info.created.isoformat()}
        index = {"hash": key_hash, **about}
        record = {"tenant": tenant, "tenant_uid": tenant_uid, "key_id": info.key_id, **about}
        self._store.put_bytes(
            keys.api_key_index(tenant, info.key_id), json.dumps(index).encode(), "application/json"
        )
        self._store.put_bytes(keys.api_key(key_hash), json.dumps(record).encode(), "application/json")
        log.info("api key created", tenant=tenant, key_id=info.key_id, hint=info.hint)
        return key, info

    def list_keys(self, tenant: str) -> list[ApiKeyInfo]:
        """The tenant's keys (not revoked), by id."""
        found = []
        for index_key in self._store.list_keys(keys.api_keys_prefix(tenant)):
            key_id = index_key.rsplit("/", 1)[-1].removesuffix(".json")
            try:
                index = json.loads(self._store.get_bytes(index_key))
            except NotFound:
                continue  # revoked meanwhile
            created = datetime.fromisoformat(index["created"])
            found.append(ApiKeyInfo(tenant=tenant, key_id=key_id, hint=index["hint"], created=created))
        return sorted(found, key=lambda info: info.key_id)

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
        return Principal(tenant=record["tenant"], admin=False, tenant_uid=record["tenant_uid"])

    def revoke(self, key: str) -> None:
        """Make ``key`` unusable at once; NotFound if it is not a live key."""
        record = self._record(key)
        if record is None:
            raise NotFound("unknown or already revoked API key")
        self._store.delete(keys.api_key(_hash(key)))
        if "key_id" in record:
            self._store.delete(keys.api_key_index(record["tenant"], record["key_id"]))
        log.info("api key revoked", tenant=record["tenant"], key_id=record.get("key_id"))

    def revoke_id(self, tenant: str, key_id: str) -> None:
        """Make the key ``key_id`` of ``tenant`` unusable at once; NotFound if the tenant has no such key."""
        index_key = keys.api_key_index(tenant, key_id)
        try:
            key_hash = json.loads(self._store.get_bytes(index_key))["hash"]
        except NotFound:
            raise NotFound(f"API key {key_id!r} of tenant {tenant!r} not found") from None
        self._store.delete(keys.api_key(key_hash))
        self._store.delete(index_key)
        log.info("api key revoked", tenant=tenant, key_id=key_id)

    def _record(self, key: str) -> dict[str, str] | None:
        if not key.startswith(KEY_PREFIX):
            return None
        try:
            return json.loads(self._store.get_bytes(keys.api_key(_hash(key))))
        except NotFound:
            return None


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
