"""Shard building and dataset tools (run as `python -m data_pipelines.<tool>`)."""
