"""The orchestrator: a Dagster code location that runs federated rounds across site workers."""
