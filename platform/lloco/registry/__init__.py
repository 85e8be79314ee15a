"""What the platform knows about each tenant: documents, compressed contexts, datasets, adapters.

``Tenants`` creates and deletes tenants (admin level); a ``Registry`` is one tenant's view, which cannot
reach another tenant's keys. ``records`` holds the dataclasses and their stored forms; ``pages`` the one
page-token format of every List call.
"""

from lloco.registry.records import (
    AdapterVersion,
    ContextInfo,
    DatasetRow,
    DocumentInfo,
    Segment,
    TenantInfo,
    document_text,
    segment_rows,
)
from lloco.registry.tenant import Registry
from lloco.registry.tenants import Tenants

__all__ = [
    "AdapterVersion",
    "ContextInfo",
    "DatasetRow",
    "DocumentInfo",
    "Registry",
    "Segment",
    "TenantInfo",
    "Tenants",
    "document_text",
    "segment_rows",
]
