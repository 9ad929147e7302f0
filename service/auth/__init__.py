"""API keys: generation, hashing at rest, storage, and verification (no HTTP here)."""
