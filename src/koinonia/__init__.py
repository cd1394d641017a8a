"""Koinonia: church texting service backend."""
