"""Test harness pieces shipped with the library (used by tests/ and bench/)."""
