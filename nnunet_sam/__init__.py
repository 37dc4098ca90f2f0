"""nnunet-sam: semi-supervised nnU-Net v2 with SAM-refined pseudo labels."""

__version__ = "0.1.0"
