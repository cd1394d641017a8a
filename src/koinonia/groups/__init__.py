"""Groups of members, with bulk membership changes."""
