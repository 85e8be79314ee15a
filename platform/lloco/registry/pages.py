"""Pagination of every List call (AIP-158): page sizes and the one page-token format.

A token is opaque to callers: the base64url of ``{"list": collection, "after": last id}``. It names the
collection that issued it, so a token of one List call (or a made-up one) is refused by another rather
than read as a position in it. Collections are listed in id order (or its reverse), so a page resumes
after the last id of the one before.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable

from lloco.errors import InvalidArgument
from lloco.storage import keys

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def page_size(requested: int, maximum: int = MAX_PAGE_SIZE) -> int:
    """AIP-158: 0 is the default, negative is an error, over the maximum is lowered to it."""
    if requested < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {requested}")
    return min(requested or DEFAULT_PAGE_SIZE, maximum)


def page_token(collection: str, last: str) -> str:
    """The token of the page after the one that ended with id ``last``."""
    return base64.urlsafe_b64encode(json.dumps({"list": collection, "after": last}).encode()).decode()


def after(collection: str, token: str) -> str | None:
    """The last id of the previous page, from a token a List call of ``collection`` issued; None for "".

    Raises:
        InvalidArgument: the token was not issued by a List call of ``collection``.
    """
    if not token:
        return None
    try:
        fields = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        kind, last = fields["list"], fields["after"]
    except (binascii.Error, UnicodeError, ValueError, KeyError, TypeError, RecursionError):
        kind, last = None, None
    if kind != collection or not isinstance(last, str) or not last:
        raise InvalidArgument(
            f"page_token {keys.show(token)} was not issued by this List call; start from ''"
        )
    return last


def paginate(
    collection: str, ids: Iterable[str], size: int, token: str, newest_first: bool = False
) -> tuple[list[str], str]:
    """One page of ``ids`` (ascending, or descending with ``newest_first``) and the next page's token."""
    last = after(collection, token)
    ordered = sorted(ids, reverse=newest_first)
    if last is not None:
        ordered = [i for i in ordered if (i < last if newest_first else i > last)]
    page = ordered[:size]
    return page, page_token(collection, page[-1]) if len(ordered) > size else ""
