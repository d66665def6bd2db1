"""Judges: rule-based (shapes pixels and text, digits classifier) and model-based over HTTP."""
