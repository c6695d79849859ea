"""Low-precision training: FP8 linear layers and their scaling recipes (fp8.py)."""
