"""Pieces of ``medp2x.evaluate``: how images are shown to an encoder (``images``), paired
bootstrap intervals (``paired``) and the written report (``report``)."""
