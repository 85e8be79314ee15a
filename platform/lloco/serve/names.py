"""Resource names of the API (AIP-122): ``tenants/{tenant}/documents/{document}`` and the rest, and who may
act on them.

Clients send names, never store keys; the edge parses a name into ids here (each checked as an id: no
``/``, no leading dot, so no name reaches outside its tenant's keys), checks that the caller may act on
the name's tenant before anything is read (PERMISSION_DENIED), and builds the names of its replies.
"""

from __future__ import annotations

from lloco.auth import Principal
from lloco.errors import InvalidArgument, PermissionDenied
from lloco.storage import keys


def parse_name(field: str, value: str, collections: tuple[str, ...]) -> list[str]:
    """The ids of a resource name: ``collections=("tenants", "documents")`` parses
    ``tenants/{tenant}/documents/{document}`` into ``[tenant, document]``.

    Raises:
        InvalidArgument: naming ``field``, for an empty name, another shape, or an id that is not one.
    """
    template = "/".join(f"{c}/{{{c[:-1]}}}" for c in collections)
    if not value:
        raise InvalidArgument(f"{field} is required: a name of the form {template!r}")
    parts = value.split("/")
    if len(parts) != 2 * len(collections) or tuple(parts[0::2]) != collections:
        raise InvalidArgument(f"{field} {keys.show(value)} is not a name of the form {template!r}")
    ids = parts[1::2]
    try:
        for collection, value_id in zip(collections, ids, strict=True):
            if collection == "versions":
                keys.validate_version(value_id)
            else:
                keys.validate_id(collection[:-1], value_id)
    except InvalidArgument as error:
        raise InvalidArgument(f"{field}: {error}") from None
    return ids


def field_id(field: str, kind: str, value: str) -> str:
    """A caller-chosen id (``document_id``, ``dataset_id``...): required and valid."""
    if not value:
        raise InvalidArgument(f"{field} is required")
    try:
        return keys.validate_id(kind, value)
    except InvalidArgument as error:
        raise InvalidArgument(f"{field}: {error}") from None


def tenant_name(tenant: str) -> str:
    return f"tenants/{tenant}"


def document_name(tenant: str, doc_id: str) -> str:
    return f"tenants/{tenant}/documents/{doc_id}"


def adapter_name(tenant: str, adapter: str) -> str:
    return f"tenants/{tenant}/adapters/{adapter}"


def version_name(tenant: str, adapter: str, version: str) -> str:
    return f"tenants/{tenant}/adapters/{adapter}/versions/{version}"


def dataset_name(tenant: str, dataset: str) -> str:
    return f"tenants/{tenant}/datasets/{dataset}"


def job_name(tenant: str, job_id: str) -> str:
    return f"tenants/{tenant}/jobs/{job_id}"


def api_key_name(tenant: str, key_id: str) -> str:
    return f"tenants/{tenant}/apiKeys/{key_id}"


# -- who may act on a name ------------------------------------------------------------------------


def authorize(principal: Principal, tenant: str) -> None:
    """PermissionDenied unless ``principal`` may act on ``tenant`` (its own, or any for the admin key)."""
    if not principal.admin and principal.tenant != tenant:
        raise PermissionDenied(
            f"this API key cannot act on {tenant_name(tenant)}: it belongs to another tenant"
        )


def owned(principal: Principal, field: str, name: str, collections: tuple[str, ...]) -> list[str]:
    """The ids of ``name``, once ``principal`` is allowed to act on its tenant."""
    ids = parse_name(field, name, collections)
    authorize(principal, ids[0])
    return ids


def owned_under(principal: Principal, tenant: str, field: str, name: str, collection: str) -> str:
    """The id of a ``tenants/{t}/{collection}/{id}`` name that must lie under ``tenant``."""
    owner, value_id = owned(principal, field, name, ("tenants", collection))
    if owner != tenant:
        raise InvalidArgument(f"{field}: {keys.show(name)} is not under {tenant_name(tenant)}")
    return value_id
