"""Thin argparse front-ends, one per console script."""
