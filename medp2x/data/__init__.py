"""Readers: one module per source kind, all yielding the same 2D sample (see ``base.py``)."""
