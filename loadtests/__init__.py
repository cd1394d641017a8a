"""Load tests: artillery against the running API (see loadtests/runner.py)."""
