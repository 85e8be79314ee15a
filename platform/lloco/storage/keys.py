"""Every object key of the platform is built here, and only here, from validated ids.

Keys are logical (``tenants/acme/docs/report/source.txt``); :func:`physical` puts them under the
store's optional prefix. Because every id matches ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}`` (no ``/``, no
leading dot), no id can climb out of, or reach into, another prefix.

Caller text that names an object (an ingest ``source_uri``) goes through :func:`normalize_key`, the
one check of a free-form key: S3 treats ``a//b``, ``a/./b`` or ``a/%2e%2e/b`` as keys of their own,
while tools and people read them as ``a/b`` or a climb, so such keys are refused rather than guessed
at. :func:`physical` applies it to every key the store is given.
"""

from __future__ import annotations

import re

from lloco.errors import InvalidArgument

ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_ID = re.compile(ID_PATTERN)
_VERSION = re.compile(r"v[0-9]{6}")
_SHOWN_CHARS = 40


def validate_id(kind: str, value: object) -> str:
    """``value`` if it is a valid id, else InvalidArgument naming ``kind`` and the bad value."""
    if not is_id(value):
        raise InvalidArgument(
            f"invalid {kind} id {show(value)}: must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def is_id(value: object) -> bool:
    """Whether ``value`` is a valid id (what :func:`validate_id` accepts)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def show(value: object) -> str:
    """``repr(value)``, cut short so a huge bad id cannot flood an error message."""
    if isinstance(value, str) and len(value) > _SHOWN_CHARS:
        return f"{value[:_SHOWN_CHARS]!r}... ({len(value)} chars)"
    return repr(value)


def validate_version(value: object) -> str:
    """``value`` if it is an adapter version like ``v000001``, else InvalidArgument."""
    if not isinstance(value, str) or not _VERSION.fullmatch(value):
        raise InvalidArgument(f"invalid adapter version {show(value)}: expected e.g. 'v000001'")
    return value


def version_name(number: int) -> str:
    """The version string of the ``number``-th published version (1 -> ``v000001``)."""
    return f"v{number:06d}"


def version_number(version: str) -> int:
    return int(validate_version(version)[1:])


_KEY_CHARS = re.compile(r"[^\x00-\x1f\x7f\\%]+")
MAX_KEY_BYTES = 1024  # the S3 limit


def normalize_key(value: str, what: str = "key", folder_ok: bool = False) -> str:
    """``value`` if it is a plain relative object key, else InvalidArgument naming ``what``.

    A plain key is ``/``-separated segments, none empty, ``.`` or ``..``, with no backslash, no
    ``%`` (percent-escapes), no control character, at most 1024 bytes. With ``folder_ok`` a
    trailing ``/`` (a folder prefix) and the empty string (the root) are allowed too.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be text, got {type(value).__name__}")
    if value == "" and folder_ok:
        return value
    body = value[:-1] if folder_ok and value.endswith("/") else value
    if not body:
        raise InvalidArgument(f"{what} is empty")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise InvalidArgument(f"{what} is longer than {MAX_KEY_BYTES} bytes")
    if not _KEY_CHARS.fullmatch(body):
        raise InvalidArgument(
            f"{what} {show(value)} has a backslash, a '%' escape or a control character; "
            "send the key as plain text"
        )
    for segment in body.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidArgument(
                f"{what} {show(value)} has an empty, '.' or '..' path segment; send the plain key"
            )
    return value


def physical(prefix: str, key: str) -> str:
    """``key`` as stored in the bucket: under ``prefix`` (a folder, given with or without a slash).

    InvalidArgument unless ``key`` is a plain key or folder (:func:`normalize_key`)."""
    normalize_key(key, folder_ok=True)
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


def logical(prefix: str, physical_key: str) -> str:
    """The inverse of :func:`physical`."""
    prefix = prefix.strip("/")
    return physical_key[len(prefix) + 1 :] if prefix else physical_key


TENANTS = "tenants/"
RESERVED_AREAS = frozenset({"tenants", "auth", "models", "checkpoints"})  # top-level folders of the platform


def tenant_root(t: str) -> str:
    return f"{TENANTS}{validate_id('tenant', t)}/"


def tenant_meta(t: str) -> str:
    return f"{tenant_root(t)}tenant.json"


def docs_prefix(t: str) -> str:
    return f"{tenant_root(t)}docs/"


def doc_prefix(t: str, d: str) -> str:
    return f"{docs_prefix(t)}{validate_id('document', d)}/"


def doc_source(t: str, d: str) -> str:
    return f"{doc_prefix(t, d)}source.txt"


def doc_meta(t: str, d: str) -> str:
    return f"{doc_prefix(t, d)}meta.json"


def contexts_prefix(t: str, compressor_id: str | None = None) -> str:
    """The contexts of one compressor, or (``None``) of every compressor of the tenant."""
    root = f"{tenant_root(t)}contexts/"
    return root if compressor_id is None else f"{root}{validate_id('compressor', compressor_id)}/"


CONTEXT_SUFFIX = ".safetensors"


def context(t: str, compressor_id: str, d: str) -> str:
    return f"{contexts_prefix(t, compressor_id)}{validate_id('document', d)}{CONTEXT_SUFFIX}"


def index_prefix(t: str, compressor_id: str | None = None) -> str:
    """The retrieval index over one compressor's segments (``None``: the indexes of every compressor)."""
    root = f"{tenant_root(t)}index/"
    return root if compressor_id is None else f"{root}{validate_id('compressor', compressor_id)}/"


def index_current(t: str, compressor_id: str) -> str:
    """The pointer to the index version readers load (written last, after the version's files)."""
    return f"{index_prefix(t, compressor_id)}current.json"


def index_version_prefix(t: str, compressor_id: str, build_id: str) -> str:
    """The files of one index version (a random build id: concurrent builders never share a folder)."""
    return f"{index_prefix(t, compressor_id)}builds/{validate_id('index build', build_id)}/"


def datasets_prefix(t: str) -> str:
    return f"{tenant_root(t)}datasets/"


DATASET_SUFFIX = ".jsonl"


def dataset(t: str, name: str) -> str:
    return f"{datasets_prefix(t)}{validate_id('dataset', name)}{DATASET_SUFFIX}"


def adapters_prefix(t: str) -> str:
    return f"{tenant_root(t)}adapters/"


def adapter_prefix(t: str, name: str) -> str:
    """Everything of one adapter: its versions and its ``current`` pointer."""
    return f"{adapters_prefix(t)}{validate_id('adapter', name)}/"


def adapter_version_prefix(t: str, name: str, version: str) -> str:
    return f"{adapter_prefix(t, name)}{validate_version(version)}/"


def adapter_file(t: str, name: str, version: str, filename: str) -> str:
    return f"{adapter_version_prefix(t, name, version)}{validate_id('adapter file', filename)}"


def adapter_current(t: str, name: str) -> str:
    return f"{adapter_prefix(t, name)}current"


def uploads_prefix(t: str, template: str = "tenants/{tenant}/uploads/") -> str:
    """Where ``t`` may put texts for ``IngestDocument(source_uri=...)``: ``template`` with the tenant id.

    The template (``StoreSettings.uploads_template``) must pass :func:`check_uploads_template`.
    """
    return template.replace("{tenant}", validate_id("tenant", t))


def check_uploads_template(template: str) -> str:
    """``template`` if it gives every tenant a folder of its own that holds none of the platform's data.

    ``{tenant}`` must be one whole segment and the template a folder (trailing ``/``), so no tenant's
    folder is a prefix of another's; it must be the tenant's ``uploads/`` folder (or below it), or
    lie outside the platform's areas (``tenants/``, ``auth/``, ``models/``, ``checkpoints/``).
    """
    normalize_key(template, "uploads template", folder_ok=True)
    segments = template.split("/")[:-1]
    if not template.endswith("/") or segments.count("{tenant}") != 1 or template.count("{tenant}") != 1:
        raise InvalidArgument(
            f"uploads template {template!r} must be a folder ending in '/' with '{{tenant}}' as one whole segment"
        )
    inside_tenant = segments[:3] == ["tenants", "{tenant}", "uploads"]
    if not inside_tenant and segments[0] in RESERVED_AREAS:
        raise InvalidArgument(
            f"uploads template {template!r} points into the platform's own data; use "
            "'tenants/{tenant}/uploads/...' or a folder outside tenants/, auth/, models/ and checkpoints/"
        )
    return template


def jobs_prefix(t: str) -> str:
    return f"{tenant_root(t)}jobs/"


JOB_SUFFIX = ".json"


def job_record(t: str, job_id: str) -> str:
    """One job's record under one of the tenants it works for (``lloco.jobs``)."""
    return f"{jobs_prefix(t)}{validate_id('job', job_id)}{JOB_SUFFIX}"


def model_prefix(model_id: str) -> str:
    return f"models/{validate_id('model', model_id)}/"


CHECKPOINTS = "checkpoints/"


def checkpoints_prefix(job_id: str) -> str:
    return f"{CHECKPOINTS}{validate_id('job', job_id)}/"


def tenant_checkpoints(job_id: str, t: str) -> str:
    """One tenant's checkpoints of a finetune job (outside the tenant's folder: deleted with it)."""
    return f"{checkpoints_prefix(job_id)}{validate_id('tenant', t)}/"


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def api_key(key_hash: str) -> str:
    """The record of one API key, named by the sha256 (hex) of the key: the key itself is never stored."""
    if not _SHA256_HEX.fullmatch(key_hash):
        raise InvalidArgument("API key hash must be 64 lowercase hex digits")
    return f"auth/api-keys/{key_hash}.json"


def api_keys_prefix(t: str) -> str:
    """The tenant's index of its API keys (id -> record), which revocation and deletion go through."""
    return f"{tenant_root(t)}api-keys/"


def api_key_index(t: str, key_id: str) -> str:
    return f"{api_keys_prefix(t)}{validate_id('API key', key_id)}.json"
