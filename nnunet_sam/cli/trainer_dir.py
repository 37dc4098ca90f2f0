"""nnsam_trainer_dir: print the folder of nnunet-sam's trainers, for
``export nnUNet_extTrainer=$(nnsam_trainer_dir)``."""

from __future__ import annotations

import sys
from pathlib import Path


def trainer_dir() -> Path:
    """The absolute path of `nnunet_sam/trainers/`."""
    import nnunet_sam.trainers

    return Path(nnunet_sam.trainers.__file__).resolve().parent


def main() -> None:
    sys.stdout.write(f"{trainer_dir()}\n")


if __name__ == "__main__":
    main()
