"""The interval engine: claim, read in chunks, transform, dead-letter, write idempotently, version, commit."""
