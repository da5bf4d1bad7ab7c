"""tandemspec: edge-cloud hybrid decoding with an on-device drafter and a cloud verifier."""

__version__ = "0.1.0"
