"""The Prefect flow that drives the DVC pipeline: pipeline (the flow and its stage task), cli
(`python -m flows.pipeline run|serve|rollback`), dvc_repo (what it reads and writes through DVC),
remote (the team's DVC remote), summary (its artifact), errors."""
