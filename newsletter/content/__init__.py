"""Issue content: the typed model and the parsers that produce it."""
