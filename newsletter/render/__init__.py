"""Rendering: issue to HTML and text once, then per-recipient message bytes."""
