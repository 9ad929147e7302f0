"""Exports of cached engines into the formats serving systems load (Triton model repositories)."""
