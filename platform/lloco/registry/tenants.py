"""Tenant lifecycle (admin level): create, look up, list and delete tenants with everything they own."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

from lloco.errors import AlreadyExists, Internal, InvalidArgument, NotFound
from lloco.logs import get_logger
from lloco.registry.records import TenantInfo, json_bytes, now
from lloco.storage import ObjectStore, keys

log = get_logger(__name__)


class Tenants:
    """Tenant lifecycle (admin level). A tenant exists while its ``tenant.json`` does.

    Everything a tenant owns lies under its folder, except its API key records (``auth/``, found
    through the index under its folder), its finetune checkpoints (``checkpoints/{job}/{tenant}/``) and,
    with an operator's uploads template outside ``tenants/``, its uploads folder. Deletion removes all
    of them; so does creation, for leftovers of a deletion that was cut short, so a new tenant never
    inherits an old one's objects.
    """

    def __init__(self, store: ObjectStore) -> None:
        self._store = store

    def create(self, tenant: str) -> TenantInfo:
        """Create ``tenant``; AlreadyExists if it is there."""
        if self.exists(tenant):
            raise AlreadyExists(f"tenant {tenant!r} already exists")
        leftovers = self._purge(tenant)
        info = TenantInfo(tenant=tenant, uid=uuid.uuid4().hex, created=now())
        meta = {"tenant": tenant, "created": info.created.isoformat(), "uid": info.uid}
        self._store.put_bytes(keys.tenant_meta(tenant), json_bytes(meta), "application/json")
        log.info("tenant created", tenant=tenant, leftovers_removed=leftovers)
        return info

    def exists(self, tenant: str) -> bool:
        return self._store.exists(keys.tenant_meta(tenant))

    def info(self, tenant: str) -> TenantInfo | None:
        """The tenant's creation record; None if there is no such tenant."""
        try:
            meta = json.loads(self._store.get_bytes(keys.tenant_meta(tenant)))
            return TenantInfo(
                tenant=tenant, uid=str(meta["uid"]), created=datetime.fromisoformat(meta["created"])
            )
        except NotFound:
            return None
        except (ValueError, KeyError, TypeError) as error:
            raise Internal(f"tenant {tenant!r} has a damaged record in the store") from error

    def uid(self, tenant: str) -> str | None:
        """What tells this tenant apart from an earlier one of the same name (None: no such tenant)."""
        info = self.info(tenant)
        return info.uid if info else None

    def list(self) -> list[str]:
        return [t for t in self._store.list_children(keys.TENANTS) if self.exists(t)]

    def delete(self, tenant: str) -> int:
        """Delete ``tenant`` and everything it owns; returns the number of objects removed.

        The marker goes first, so the tenant (and every key of it) is gone at once; the rest follows.
        Deleting again finishes a deletion that was cut short. NotFound when there is neither the
        tenant nor anything left of it.
        """
        existed = self.exists(tenant)
        if existed:
            self._store.delete(keys.tenant_meta(tenant))
        removed = self._purge(tenant)
        if not existed and not removed:
            raise NotFound(f"tenant {tenant!r} not found")
        log.info("tenant deleted", tenant=tenant, objects=removed)
        return removed

    def _purge(self, tenant: str) -> int:
        """Remove every object of ``tenant`` (whose marker is gone or not yet written)."""
        store = self._store
        removed = 0
        for index in list(store.list_keys(keys.api_keys_prefix(tenant))):
            try:
                key_hash = json.loads(store.get_bytes(index))["hash"]
                store.delete(keys.api_key(key_hash))
                removed += 1
            except (NotFound, ValueError, KeyError, TypeError, InvalidArgument):
                log.warning(
                    "api key index entry unreadable; its record is dead with the tenant", tenant=tenant
                )
        for job_id in list(store.list_children(keys.CHECKPOINTS)):
            removed += store.delete_prefix(keys.tenant_checkpoints(job_id, tenant))
        uploads = keys.uploads_prefix(tenant, store.settings.uploads_template)
        if not uploads.startswith(keys.tenant_root(tenant)):
            removed += store.delete_prefix(uploads)
        return removed + store.delete_prefix(keys.tenant_root(tenant))
