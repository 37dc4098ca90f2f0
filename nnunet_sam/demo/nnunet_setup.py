"""Setting up nnU-Net on a small synthetic dataset in one process, quickly: planning and preprocessing
without process-pool start-up, and very short trainer variants (tiny subclasses, the nnU-Net way).
Used by the tests, the benchmarks and the demo."""

from __future__ import annotations

from contextlib import contextmanager
from multiprocessing.pool import ThreadPool
from pathlib import Path

OUR_TRAINERS = ("nnUNetTrainerSAMPseudo", "nnUNetTrainerMeanTeacher", "nnUNetTrainerSAMPseudoMeanTeacher")

SHORT_TRAINERS = '''"""Very short versions of nnunet-sam's trainers (and nnU-Net's) for tests and benchmarks."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunet_sam.trainers.nnUNetTrainerMeanTeacher import nnUNetTrainerMeanTeacher
from nnunet_sam.trainers.nnUNetTrainerSAMPseudo import nnUNetTrainerSAMPseudo
from nnunet_sam.trainers.nnUNetTrainerSAMPseudoMeanTeacher import nnUNetTrainerSAMPseudoMeanTeacher


def _shorten(trainer):
    trainer.num_epochs = {epochs}
    trainer.num_iterations_per_epoch = {iterations}
    trainer.num_val_iterations_per_epoch = {val_iterations}
    trainer.save_every = {save_every}
'''
SHORT_CLASS = '''

class {name}{suffix}({name}):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        _shorten(self)
'''


def write_short_trainers(folder: Path, epochs: int = 2, iterations: int = 2, suffix: str = "Short",
                         val_iterations: int = 1, save_every: int = 1) -> None:
    """`folder/<suffix lower-case>_trainers.py` with `<Name><suffix>` for nnU-Net's trainer and ours: `epochs` x
    `iterations` training iterations, `val_iterations` validation batches per epoch, the latest checkpoint
    saved every `save_every` epochs."""
    folder.mkdir(parents=True, exist_ok=True)
    text = SHORT_TRAINERS.format(epochs=epochs, iterations=iterations, val_iterations=val_iterations,
                                 save_every=save_every)
    text += "".join(SHORT_CLASS.format(name=n, suffix=suffix) for n in ("nnUNetTrainer", *OUR_TRAINERS))
    (folder / f"{suffix.lower()}_trainers.py").write_text(text)


@contextmanager
def spawn_pools_in_threads():
    """nnU-Net's planning and preprocessing start 'spawn' process pools; each worker re-imports torch
    (about 5 s on 2 cores) to do milliseconds of work on this tiny dataset. Run those pools as thread
    pools: the same nnU-Net code, without the start-up cost."""
    import multiprocessing

    original = multiprocessing.get_context

    class _Threads:
        Pool = ThreadPool

    multiprocessing.get_context = lambda method=None: _Threads if method == "spawn" else original(method)
    try:
        yield
    finally:
        multiprocessing.get_context = original


def plan_and_preprocess(dataset_id: int, configurations: tuple[str, ...] = ("3d_fullres",)) -> None:
    """nnUNetv2_plan_and_preprocess -d ID -c CONFIGURATIONS -np 1 (no integrity check), in this process."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)

    with spawn_pools_in_threads():
        extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=False, show_progress_bar=False)
        plan_experiments([dataset_id])
        preprocess([dataset_id], configurations=configurations, num_processes=(1,) * len(configurations),
                   show_progress_bar=False)
