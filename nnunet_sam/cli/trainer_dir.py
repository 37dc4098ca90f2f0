"""nnsam_trainer_dir: print the folder of nnunet-sam's trainers, for
``export nnUNet_extTrainer=$(nnsam_trainer_dir)``."""

from __future__ import annotations

import sys
from pathlib import Path

from nnunet_sam.errors import NnsamError


def trainer_dir() -> Path:
    """The absolute path of the trainers' folder: `trainers/` of the source tree in an editable install, the
    subpackage `nnunet_sam/trainers/` of an installed wheel."""
    import nnunet_sam.trainers

    if nnunet_sam.trainers.__file__ is None:  # a folder without __init__.py took the package's name
        leftover = next(iter(nnunet_sam.trainers.__path__))
        raise NnsamError(f"{leftover} is left over from an older nnunet-sam (the trainers now live in the top-level "
                         f"trainers/ folder); remove it: rm -r {leftover}")
    return Path(nnunet_sam.trainers.__file__).resolve().parent


def main() -> None:
    """Print the folder; a broken install is one line on stderr and exit status 2, as our other commands do."""
    try:
        folder = trainer_dir()
    except NnsamError as exc:
        print(f"nnsam_trainer_dir: error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(f"{folder}\n")


if __name__ == "__main__":
    main()
