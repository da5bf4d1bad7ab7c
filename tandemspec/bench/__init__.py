"""tandem bench: what hybrid decoding saves, measured over an emulated link."""
