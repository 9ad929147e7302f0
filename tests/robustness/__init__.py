"""Robustness: schema-driven API testing and fuzzing of the parsers that read client bytes."""
