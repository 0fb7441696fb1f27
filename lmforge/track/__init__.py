"""What happened in each run: MLflow runs and store, lineage, the registry and promotion, health
checks of the servers."""
