"""Metrics and logs: what operators see of a running service (no HTTP here)."""
