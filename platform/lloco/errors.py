"""Domain errors, and the one place that maps them to gRPC status codes."""

from __future__ import annotations

import grpc
from pydantic import ValidationError


class LlocoError(Exception):
    """Base of every error a user can act on; the message is shown to the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(LlocoError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LlocoError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LlocoError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(LlocoError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(LlocoError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(LlocoError):
    """A quota or limit was hit; retrying later or asking for less can succeed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(LlocoError):
    """The system is not in the state the call needs (e.g. no adapter published yet)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(LlocoError):
    """A backing service (S3, Ray) cannot be reached; the call may be retried."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LlocoError):
    """Waiting for something (a job to end) took longer than the caller allowed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LlocoError):
    code = grpc.StatusCode.CANCELLED


class Internal(LlocoError):
    code = grpc.StatusCode.INTERNAL


def invalid_fields(what: str, error: ValidationError) -> InvalidArgument:
    """``error`` as an InvalidArgument naming each bad field of ``what`` and why (no pydantic URLs or
    echoed inputs): ``bad eval options: perplexity_windows: Input should be greater than or equal to 1``."""
    problems = [
        f"{'.'.join(str(part) for part in item['loc']) or 'value'}: {item['msg'].removeprefix('Value error, ')}"
        for item in error.errors(include_url=False, include_input=False)
    ]
    return InvalidArgument(f"bad {what}: {'; '.join(problems)}")


def to_grpc_status(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a gRPC caller sees for ``error``.

    Unknown exceptions become INTERNAL without leaking their text.
    """
    if isinstance(error, LlocoError):
        return error.code, str(error)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see server logs"
