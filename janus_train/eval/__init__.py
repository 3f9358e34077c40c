"""Evaluation: validation loss, understanding accuracy (QA, MMBench), generation scored by a pluggable scorer."""
