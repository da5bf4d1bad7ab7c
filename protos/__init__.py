"""tandemspec."""
