"""Liveness, readiness and the dependency health report."""
