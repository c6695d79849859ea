"""Pretraining objectives as sample transforms (one file each)."""
