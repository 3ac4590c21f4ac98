"""Tests of graphtune.data (code-corpus curation)."""
