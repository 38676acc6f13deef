"""medp2x: double pretraining (P2X) of medical-image encoders."""

__version__ = "0.1.0"
