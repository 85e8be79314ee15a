"""Offline compression of documents into contexts: the Ray Data job and the online path of the engine."""

from lloco.compress.job import CompressSummary, DocumentFailure, run_compress_job
from lloco.compress.online import compress_online

__all__ = ["CompressSummary", "DocumentFailure", "compress_online", "run_compress_job"]
