"""The public QA sets that evaluation and compressor pretraining read: ``lloco data fetch``."""
