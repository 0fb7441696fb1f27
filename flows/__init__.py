"""The Prefect flow that drives the DVC pipeline: pipeline (the flow, its stage task, the CLI),
dvc_repo (what it reads and writes through DVC), summary (its artifact), errors."""
