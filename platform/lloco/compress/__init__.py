"""Offline compression of documents into contexts: the Ray Data job and the online path of the engine.

The edge (`lloco.serve`) tokenizes what it ingests with `tokenize_segments` and hands the engine the
`PreparedDocument`, so a short document is tokenized once."""

from lloco.compress.job import CompressSummary, DocumentFailure, run_compress_job
from lloco.compress.online import compress_online
from lloco.compress.steps import PreparedDocument, tokenize_segments

__all__ = [
    "CompressSummary",
    "DocumentFailure",
    "PreparedDocument",
    "compress_online",
    "run_compress_job",
    "tokenize_segments",
]
