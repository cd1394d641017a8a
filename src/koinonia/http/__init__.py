"""HTTP plumbing shared by every feature: middleware, dependencies, pagination."""
