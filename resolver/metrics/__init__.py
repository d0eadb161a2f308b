"""Numbers for operators: the registry, the metered wrappers, the Prometheus HTTP endpoint."""
