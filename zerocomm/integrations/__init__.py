"""Integrations with training frameworks (imported on demand: each module
imports its framework)."""
