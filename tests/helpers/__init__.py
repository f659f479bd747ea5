"""Helpers shared by several test modules (plain functions; pytest fixtures live in conftest.py)."""
