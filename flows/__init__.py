"""Prefect flows over the pipeline's stages (the only package that imports prefect)."""
