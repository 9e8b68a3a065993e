"""Ingest Amazon Rekognition Video face detection and face search results into PostgreSQL."""

__version__ = "0.1.0"
