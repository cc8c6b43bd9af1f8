"""Prefect tasks: caching, retries and artifacts around the stage functions in oliveflow.stages."""
