"""Object storage: S3 access with retries, the one module that builds keys, an embedded S3 server."""

from lloco.storage import keys
from lloco.storage.embedded import EmbeddedS3
from lloco.storage.store import ObjectStore

__all__ = ["EmbeddedS3", "ObjectStore", "keys"]
