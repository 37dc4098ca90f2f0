"""Setting up nnU-Net on a small synthetic dataset in one process, quickly: planning and preprocessing
without process-pool start-up, and very short trainer variants (tiny subclasses, the nnU-Net way).
Used by the tests, the benchmarks and the demo."""

from __future__ import annotations

from contextlib import contextmanager
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Callable

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
VARIANT_CLASS = '''

class {name}({base}):
{attributes}
'''


def write_short_trainers(folder: Path, epochs: int = 2, iterations: int = 2, suffix: str = "Short",
                         val_iterations: int = 1, save_every: int = 1,
                         variants: dict[str, tuple[str, dict]] | None = None) -> None:
    """`folder/<suffix lower-case>_trainers.py` with `<Name><suffix>` for nnU-Net's trainer and ours: `epochs` x
    `iterations` training iterations, `val_iterations` validation batches per epoch, the latest checkpoint
    saved every `save_every` epochs. `variants`: more classes, name -> (base among those, class attributes)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = SHORT_TRAINERS.format(epochs=epochs, iterations=iterations, val_iterations=val_iterations,
                                 save_every=save_every)
    text += "".join(SHORT_CLASS.format(name=n, suffix=suffix) for n in ("nnUNetTrainer", *OUR_TRAINERS))
    for name, (base, attributes) in (variants or {}).items():
        lines = "\n".join(f"    {key} = {value!r}" for key, value in attributes.items()) or "    pass"
        text += VARIANT_CLASS.format(name=name, base=base, attributes=lines)
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


def plan_and_preprocess(dataset_id: int, configurations: tuple[str, ...] = ("3d_fullres",),
                        adjust_plans: Callable[[dict], None] | None = None) -> None:
    """nnUNetv2_plan_and_preprocess -d ID -c CONFIGURATIONS -np 1 (no integrity check), in this process.
    `adjust_plans` may edit the plans (nnUNetPlans.json) between planning and preprocessing, as a user edits
    a plans file."""
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    with spawn_pools_in_threads():
        extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=False, show_progress_bar=False)
        plan_experiments([dataset_id])
        if adjust_plans is not None:
            path = str(Path(nnUNet_preprocessed) / maybe_convert_to_dataset_name(dataset_id) / "nnUNetPlans.json")
            plans = load_json(path)
            adjust_plans(plans)
            save_json(plans, path, sort_keys=False)
        preprocess([dataset_id], configurations=configurations, num_processes=(1,) * len(configurations),
                   show_progress_bar=False)


CPU_2D_FEATURES = (16, 128)  # base features and cap of the CPU-sized 2d U-Net (nnU-Net's defaults: 32, 512)


def cpu_sized_2d_network(plans: dict) -> None:
    """Make the plans' 2d U-Net narrower for CPU runs (demo, benchmarks): `CPU_2D_FEATURES` base features doubling
    per stage up to the cap, instead of nnU-Net's 32 up to 512. Same stages, patch and batch size: about 3x less
    time per iteration on 2 CPU cores, so that trainings on tens of cases converge in minutes."""
    base, cap = CPU_2D_FEATURES
    kwargs = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [min(base * 2 ** i, cap) for i in range(kwargs["n_stages"])]
