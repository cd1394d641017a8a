"""Contract fuzzing of the running API with schemathesis (`scripts/contract-test`)."""
