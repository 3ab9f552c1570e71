"""Prefect flows: one flow run per batch."""
