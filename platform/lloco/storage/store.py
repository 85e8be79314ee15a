"""Objects on any S3 (AWS, SeaweedFS, MinIO) through one boto3 client.

Retries live in one place: botocore's own retries are off and every call goes through tenacity,
which retries transient failures (connection errors, timeouts, 5xx, throttling) with exponential
backoff for at most ``max_attempts`` attempts, starting no new attempt ``read_timeout_s`` after the
first. What is still failing then becomes ``Unavailable``; a missing object becomes ``NotFound``.
Keys given to this class are logical (built by ``lloco.storage.keys``); the store puts them under
its prefix.
"""

from __future__ import annotations

import builtins
import functools
import io
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, TypeVar

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
)
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from lloco.config import StoreSettings
from lloco.errors import Internal, InvalidArgument, LlocoError, NotFound, Unavailable
from lloco.logs import get_logger
from lloco.storage import keys

log = get_logger(__name__)

T = TypeVar("T")

_TRANSIENT_TYPES: tuple[type[BaseException], ...] = (
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
    builtins.ConnectionError,
    builtins.TimeoutError,
)
_TRANSIENT_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "SlowDown",
        "RequestTimeout",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "ServiceUnavailable",
        "InternalError",
    }
)
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_DELETE_BATCH = 1000
_STREAM_BUFFER = 1 << 20


class ObjectStore:
    """One bucket (and optional prefix) of an S3 service. Thread-safe: share one per process."""

    def __init__(self, settings: StoreSettings) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix.strip("/")
        keys.normalize_key(self.prefix, "store prefix", folder_ok=True)
        keys.check_uploads_template(settings.uploads_template)
        self._where = settings.endpoint_url or "AWS S3"
        session = boto3.session.Session()
        self._client = session.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            aws_access_key_id=_secret(settings.access_key_id),
            aws_secret_access_key=_secret(settings.secret_access_key),
            config=Config(
                connect_timeout=settings.connect_timeout_s,
                read_timeout=settings.read_timeout_s,
                retries={"mode": "standard", "total_max_attempts": 1},
                s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
                signature_version="s3v4",
                max_pool_connections=32,
            ),
        )
        self._transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold_bytes,
            multipart_chunksize=settings.multipart_threshold_bytes,
            max_concurrency=4,
            num_download_attempts=1,
        )

    # -- naming -------------------------------------------------------------------------------

    def uri(self, key: str) -> str:
        """``s3://bucket/prefix/key``, for tools that take URIs (Ray Train storage_path, pyarrow)."""
        return f"s3://{self.bucket}/{keys.physical(self.prefix, key)}"

    def key_of_uri(self, uri: str, what: str = "URI") -> str:
        """The logical key of ``s3://bucket/prefix/key`` in this store (the inverse of :meth:`uri`).

        InvalidArgument names ``what`` when the URI is of another bucket or outside the prefix, or
        its key is not plain (:func:`keys.normalize_key`).
        """
        root = self.uri("")
        if not uri.startswith(root):
            raise InvalidArgument(f"{what} {keys.show(uri)} must be an object under {root!r}")
        return keys.normalize_key(uri[len(root) :], what)

    def _key(self, key: str) -> str:
        return keys.physical(self.prefix, key)

    # -- bucket -------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists already."""

        def ensure() -> None:
            try:
                self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as error:
                if _status(error) != 404:
                    raise
            location = (
                {}
                if self.settings.region == "us-east-1"
                else {"CreateBucketConfiguration": {"LocationConstraint": self.settings.region}}
            )
            try:
                self._client.create_bucket(Bucket=self.bucket, **location)
                log.info("bucket created", bucket=self.bucket, endpoint=self._where)
            except ClientError as error:
                if _code(error) != "BucketAlreadyOwnedByYou":
                    raise

        self._call("ensure_bucket", self.bucket, ensure)

    def check(self) -> None:
        """Return when the bucket answers; Unavailable (or NotFound) when it does not. For health probes."""
        self._call("check", "", lambda: self._client.head_bucket(Bucket=self.bucket))

    # -- objects ------------------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Write one whole object (multipart above the threshold); readers see all of it or none."""
        extra = {"ContentType": content_type} if content_type else {}
        physical = self._key(key)
        if len(data) > self.settings.multipart_threshold_bytes:
            self._call(
                "put",
                key,
                lambda: self._client.upload_fileobj(
                    io.BytesIO(data), self.bucket, physical, ExtraArgs=extra, Config=self._transfer
                ),
            )
        else:
            self._call(
                "put",
                key,
                lambda: self._client.put_object(Bucket=self.bucket, Key=physical, Body=data, **extra),
            )

    def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            body = self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            try:
                return body.read()
            finally:
                body.close()

        return self._call("get", key, read)

    def put_file(self, key: str, path: Path | str) -> None:
        """Upload a local file (multipart above the threshold)."""

        def upload() -> None:
            with open(path, "rb") as source:
                self._client.upload_fileobj(source, self.bucket, self._key(key), Config=self._transfer)

        self._call("put", key, upload)

    def download_file(self, key: str, path: Path | str) -> None:
        """Download into ``path``; a failed download leaves no partial file behind."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)

        def download() -> None:
            handle, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            try:
                with os.fdopen(handle, "wb") as sink:
                    self._client.download_fileobj(self.bucket, self._key(key), sink, Config=self._transfer)
                os.replace(partial, target)
            except BaseException:
                Path(partial).unlink(missing_ok=True)
                raise

        self._call("get", key, download)

    def open_stream(self, key: str) -> BinaryIO:
        """A buffered stream over the object's body; read errors surface as ``Unavailable``."""
        body = self._call(
            "get", key, lambda: self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        )
        return io.BufferedReader(_BodyReader(body, f"{self._where} {key}"), buffer_size=_STREAM_BUFFER)  # type: ignore[return-value]

    def exists(self, key: str) -> bool:
        def head() -> bool:
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as error:
                if _status(error) == 404:
                    return False
                raise

        return self._call("head", key, head)

    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing one is not an error."""
        self._call("delete", key, lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` (which must be a non-empty folder); returns how many."""
        if not prefix or not prefix.endswith("/"):
            raise InvalidArgument(f"delete_prefix needs a folder prefix ending in '/', got {prefix!r}")
        deleted = 0
        batch: list[str] = []
        for key in self.list_keys(prefix):
            batch.append(key)
            if len(batch) == _DELETE_BATCH:
                deleted += self._delete_batch(batch)
                batch = []
        if batch:
            deleted += self._delete_batch(batch)
        return deleted

    def _delete_batch(self, batch: list[str]) -> int:
        objects = [{"Key": self._key(key)} for key in batch]
        response = self._call(
            "delete",
            batch[0],
            lambda: self._client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
            ),
        )
        if response.get("Errors"):
            log.error(
                "object store refused deletes", count=len(response["Errors"]), first=response["Errors"][0]
            )
            raise Internal(
                f"the object store refused to delete {len(response['Errors'])} objects (see server logs)"
            )
        return len(batch)

    # -- listing ------------------------------------------------------------------------------

    def list_keys(
        self, prefix: str, start_after: str | None = None, limit: int | None = None
    ) -> Iterator[str]:
        """Keys under ``prefix`` in the server's order, after ``start_after`` (exclusive), at most ``limit``."""
        request = {"Bucket": self.bucket, "Prefix": self._key(prefix)}
        if start_after:
            request["StartAfter"] = self._key(start_after)
        for page in self._pages(request, prefix):
            for entry in page.get("Contents", []):
                yield keys.logical(self.prefix, entry["Key"])
                if limit is not None:
                    limit -= 1
                    if limit <= 0:
                        return

    def list_children(
        self, prefix: str, start_after: str | None = None, limit: int | None = None
    ) -> Iterator[str]:
        """Names of the immediate sub-folders of ``prefix`` (which ends in '/'), in the server's order.

        ``start_after`` is a child name: listing resumes after every key under it. ``name/~`` sorts
        after all of them, in byte order (AWS) and in path order (SeaweedFS) alike, because the keys
        of this platform use only characters below '~'.
        """
        request = {"Bucket": self.bucket, "Prefix": self._key(prefix), "Delimiter": "/"}
        if start_after:
            request["StartAfter"] = self._key(f"{prefix}{start_after}/~")
        cut = len(self._key(prefix))
        for page in self._pages(request, prefix):
            for entry in page.get("CommonPrefixes", []):
                yield entry["Prefix"][cut:].rstrip("/")
                if limit is not None:
                    limit -= 1
                    if limit <= 0:
                        return

    def _pages(self, request: dict[str, str], prefix: str) -> Iterator[dict]:
        token: str | None = None
        while True:
            continuation = {"ContinuationToken": token} if token else {}
            page = self._call(
                "list", prefix, functools.partial(self._client.list_objects_v2, **request, **continuation)
            )
            yield page
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    # -- retries and errors -------------------------------------------------------------------

    def _call(self, operation: str, key: str, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` with retries on transient errors; storage errors become lloco errors."""
        retrying = Retrying(
            stop=stop_after_attempt(self.settings.max_attempts)
            | stop_after_delay(self.settings.read_timeout_s),
            wait=wait_exponential_jitter(initial=0.1, max=2.0, jitter=0.1),
            retry=retry_if_exception(_is_transient),
            before_sleep=lambda state: self._log_retry(operation, key, state),
            reraise=True,
        )
        try:
            return retrying(attempt)
        except LlocoError:
            raise
        except Exception as error:
            translated = self._translate(operation, key, error)
            if translated is None:
                raise
            raise translated from error

    def _log_retry(self, operation: str, key: str, state: RetryCallState) -> None:
        log.warning(
            "object store call failed; retrying",
            operation=operation,
            key=key,
            attempt=state.attempt_number,
            error=repr(state.outcome.exception()) if state.outcome else None,
        )

    def _translate(self, operation: str, key: str, error: Exception) -> LlocoError | None:
        """The lloco error for a storage failure. Its message is for the API's callers: it never names
        the endpoint, the key or the storage error, which go to the log instead."""
        translated: LlocoError | None = None
        if _is_transient(error):
            translated = Unavailable("the object store is unavailable right now; retry shortly")
        elif (
            client_error := next((e for e in _causes(error) if isinstance(e, ClientError)), None)
        ) is not None:
            code = _code(client_error)
            if code == "NoSuchBucket":
                translated = NotFound("the platform's bucket does not exist (see server logs)")
            elif code in _NOT_FOUND_CODES or _status(client_error) == 404:
                return NotFound(f"object {key!r} not found")
            else:
                translated = Internal("the object store refused a request (see server logs)")
        elif any(isinstance(e, BotoCoreError | Boto3Error) for e in _causes(error)):
            translated = Internal("the object store client failed (see server logs)")
        if translated is not None:
            log.warning(
                "object store call failed",
                operation=operation,
                key=key,
                endpoint=self._where,
                bucket=self.bucket,
                error=_brief(error),
            )
        return translated


class _BodyReader(io.RawIOBase):
    """A raw stream over a botocore body that reports failures as ``Unavailable``."""

    def __init__(self, body: object, where: str) -> None:
        self._body = body
        self._where = where

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            data = self._body.read(len(buffer))  # type: ignore[attr-defined]
        except Exception as error:
            if _is_transient(error) or isinstance(error, BotoCoreError):
                log.warning("object store stream broke", where=self._where, error=_brief(error))
                raise Unavailable("the object store stream broke; retry shortly") from error
            raise
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()  # type: ignore[attr-defined]
        super().close()


def _secret(value: object) -> str | None:
    return value.get_secret_value() if value is not None else None  # type: ignore[attr-defined]


def _causes(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what it wraps: chained causes and s3transfer's ``last_exception``."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = getattr(current, "last_exception", None) or current.__cause__ or current.__context__


def _is_transient(error: BaseException) -> bool:
    for cause in _causes(error):
        if isinstance(cause, _TRANSIENT_TYPES):
            return True
        if isinstance(cause, ClientError) and (_status(cause) >= 500 or _code(cause) in _TRANSIENT_CODES):
            return True
    return False


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _status(error: ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _brief(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error)[:300]}"
