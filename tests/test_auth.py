"""API keys against a real SeaweedFS: creation, resolution, revocation, admin scope."""

from __future__ import annotations

import hashlib
import json

import pytest
from lloco.auth import KeyRing, Principal
from lloco.errors import NotFound, Unauthenticated
from lloco.registry import Tenants
from lloco.storage import ObjectStore, keys
from pydantic import SecretStr

ADMIN = "admin-secret-for-tests"


@pytest.fixture
def ring(store: ObjectStore) -> KeyRing:
    Tenants(store).create("acme")
    Tenants(store).create("beta")
    return KeyRing(store, SecretStr(ADMIN))


def test_create_resolve_revoke(ring: KeyRing, store: ObjectStore) -> None:
    key = ring.create_key("acme")
    other = ring.create_key("beta")
    assert key.startswith("lloco_") and len(key) >= len("lloco_") + 43 and key != ring.create_key("acme")
    uids = {tenant: Tenants(store).uid(tenant) for tenant in ("acme", "beta")}
    assert ring.resolve(key) == Principal(tenant="acme", admin=False, tenant_uid=uids["acme"])
    assert ring.resolve(other) == Principal(tenant="beta", admin=False, tenant_uid=uids["beta"])

    stored = [store.get_bytes(k) for k in store.list_keys("auth/")]
    assert len(stored) == 3
    assert store.exists(keys.api_key(hashlib.sha256(key.encode()).hexdigest()))
    assert not any(key.encode() in blob or other.encode() in blob for blob in stored)  # only hashes

    ring.revoke(key)
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        ring.resolve(key)
    assert ring.resolve(other).tenant == "beta"
    with pytest.raises(NotFound):
        ring.revoke(key)


def test_admin_key(ring: KeyRing, store: ObjectStore) -> None:
    assert ring.resolve(ADMIN) == Principal(tenant=None, admin=True)
    with pytest.raises(Unauthenticated):
        ring.resolve(ADMIN + "x")
    without_admin = KeyRing(store, None)
    with pytest.raises(Unauthenticated):
        without_admin.resolve(ADMIN)
    with pytest.raises(Unauthenticated):
        KeyRing(store, SecretStr("")).resolve("")


@pytest.mark.parametrize("wrong", ["", "lloco_", "lloco_" + "A" * 43, "Bearer something", "x" * 10_000])
def test_wrong_keys_are_unauthenticated(ring: KeyRing, wrong: str) -> None:
    ring.create_key("acme")
    with pytest.raises(Unauthenticated):
        ring.resolve(wrong)


def test_keys_of_a_deleted_tenant_stop_working(ring: KeyRing, store: ObjectStore) -> None:
    key = ring.create_key("beta")
    record = keys.api_key(hashlib.sha256(key.encode()).hexdigest())
    Tenants(store).delete("beta")
    assert not store.exists(record), "deletion removes the tenant's key records"
    with pytest.raises(Unauthenticated):
        ring.resolve(key)
    with pytest.raises(NotFound):
        ring.create_key("beta")
    Tenants(store).create("beta")  # a new tenant of the same name must not inherit the old keys
    with pytest.raises(Unauthenticated):
        ring.resolve(key)
    assert ring.resolve(ring.create_key("beta")).tenant == "beta"


def test_a_key_is_bound_to_its_tenants_uid(ring: KeyRing, store: ObjectStore) -> None:
    """A record that outlived its tenant (written around the index) still does not work for a new one."""
    key = ring.create_key("beta")
    meta = json.loads(store.get_bytes(keys.tenant_meta("beta")))
    store.put_bytes(keys.tenant_meta("beta"), json.dumps({**meta, "uid": "another"}).encode())
    with pytest.raises(Unauthenticated, match="no longer exists"):
        ring.resolve(key)


def test_keys_are_listed_and_revoked_by_id(ring: KeyRing, store: ObjectStore) -> None:
    first, info = ring.issue_key("acme")
    second = ring.create_key("acme")
    other = ring.create_key("beta")
    listed = ring.list_keys("acme")
    assert len(listed) == 2 and info in listed
    assert {i.hint for i in listed} == {first[:10], second[:10]}
    assert not any(first.encode() in store.get_bytes(k) for k in store.list_keys("tenants/acme/api-keys/"))
    with pytest.raises(NotFound):
        ring.revoke_id("beta", info.key_id)  # another tenant's key id: not found there
    ring.revoke_id("acme", info.key_id)
    with pytest.raises(Unauthenticated):
        ring.resolve(first)
    assert ring.resolve(second).tenant == "acme" and ring.resolve(other).tenant == "beta"
    assert [i.hint for i in ring.list_keys("acme")] == [second[:10]]
    with pytest.raises(NotFound):
        ring.revoke_id("acme", info.key_id)
    ring.revoke(second)  # by the secret: the index entry goes too
    assert ring.list_keys("acme") == []
