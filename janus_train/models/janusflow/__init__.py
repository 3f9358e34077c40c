"""JanusFlow: Janus's LLM and SigLIP with rectified-flow generation (config, model, release layout)."""
