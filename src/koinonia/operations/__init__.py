"""Operator views: slow queries and cache statistics."""
