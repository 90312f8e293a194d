"""Adapters that put the Safety Game inside other frameworks (each needs its own extra)."""
