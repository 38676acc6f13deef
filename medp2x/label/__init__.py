"""MONAI Label: a P2X encoder as a classification bundle (``export.py``) and the input and
label policy the bundle ships (``bundle_transforms.py``, copied into its ``scripts/``)."""
