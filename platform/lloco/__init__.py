"""lloco: multi-tenant LLoCO serving on Ray."""

__version__ = "0.1.0"
