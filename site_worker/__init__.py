"""The hospital side: a gRPC server that trains and evaluates next to a site's data.

It never imports the orchestrator (Dagster, MLflow): a hospital installs and runs it alone.
"""
