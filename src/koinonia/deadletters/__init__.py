"""The dead-letter queue: jobs and events that exhausted their retries."""
