"""Seconds per training iteration and peak memory of nnunet-sam's trainers against nnUNetTrainer, on the
same data, in one run.

    .venv/bin/python benchmarks/train_speed.py [--device cpu|cuda] [--iterations 20] [--warmup 2]

Data: the synthetic dataset of tests/test_trainers.py (2 labelled cases, planned and preprocessed by
nnU-Net for 3d_fullres, fold `all`) plus 2 fake unlabelled / pseudo-labelled cases (copies of the
labelled ones, in the folders our trainers read).

Each trainer lives in its own process (its own peak memory) and the iterations are interleaved: one
iteration of each trainer in turn, so that all of them run under the same load on a shared machine.
An iteration is what nnU-Net's training loop does: fetch the labelled batch, `train_step` (ours also
fetch the extra batch, run the teacher and update the EMA). Start-up and validation are not timed.
Peak memory: the process's peak resident set size (VmHWM; data-augmentation workers are separate
processes, not counted) and on CUDA `torch.cuda.max_memory_allocated`.

Prints a table and writes it into benchmarks/RESULTS.md (section "Trainer speed").
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from results import machine_description, markdown_table, update_results_section  # benchmarks/results.py

logger = logging.getLogger("train_speed")
SECTION = "Trainer speed (benchmarks/train_speed.py)"
REPO = Path(__file__).resolve().parent.parent
TRAINERS = ("nnUNetTrainer", "nnUNetTrainerSAMPseudo", "nnUNetTrainerMeanTeacher", "nnUNetTrainerSAMPseudoMeanTeacher")
# levers measured beside them on request (--levers): name -> (trainer, class attributes)
LEVERS = {"nnUNetTrainerSAMPseudoOnePass": ("nnUNetTrainerSAMPseudo", {"forward_in_parts": False})}
TARGETS = {"nnUNetTrainerSAMPseudo": 2.0, "nnUNetTrainerMeanTeacher": 2.2}  # max. time ratio to nnUNetTrainer
# (issue 29: the extra samples come on top of the planned batch, so an iteration carries twice the samples)
DATASET = "Dataset990_SyntheticCT"


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM: unlike getrusage's maxrss, not inherited at exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def trainer_process(name: str, device: str, warmup: int, connection: Connection) -> None:
    """Set up trainer `name` and run `warmup` iterations (on CUDA the first one compiles the network: the
    processes do that side by side), then one timed iteration per 'step' message; 'stop' returns memory. A failure
    is sent as {"error": ...} so that the parent can say which trainer failed and why."""
    try:
        _serve_iterations(name, device, warmup, connection)
    except BaseException as exc:
        lines = traceback.format_exception_only(type(exc), exc)
        connection.send({"error": f"{name}: {lines[-1].strip()}"})
        raise


def _serve_iterations(name: str, device: str, warmup: int, connection: Connection) -> None:
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args(DATASET, "3d_fullres", "all", name, device=torch.device(device))
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    started = time.perf_counter()
    for _ in range(warmup):
        trainer.train_step(next(trainer.dataloader_train))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    samples = trainer.batch_size + getattr(trainer, "n_extra", 0)  # ours: the planned batch + the extra samples
    connection.send({"batch_size": trainer.batch_size, "samples": samples,
                     "warmup_seconds": time.perf_counter() - started})
    while connection.recv() == "step":
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        trainer.train_step(next(trainer.dataloader_train))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        connection.send(time.perf_counter() - start)
    connection.send({"peak_rss_mib": peak_rss_mib(),
                     "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else None})
    trainer.on_train_end()


def receive(name: str, connection: Connection, process) -> object:
    """The next message of trainer `name`'s process; RuntimeError when it failed or died without answering."""
    try:
        message = connection.recv()
    except EOFError:
        process.join(timeout=10)
        raise RuntimeError(f"the {name} process ended without answering (exit code {process.exitcode})") from None
    if isinstance(message, dict) and "error" in message:
        raise RuntimeError(f"trainer process failed: {message['error']}")
    return message


def measure(device: str, warmup: int, iterations: int, trainers: tuple[str, ...] = TRAINERS) -> list[dict]:
    """Interleaved iterations of every trainer, each in its own process, after each process's own warm-up
    iterations (run side by side); medians and peak memory. A trainer that fails stops the measurement with its
    error (the other processes are ended)."""
    context = multiprocessing.get_context("spawn")
    workers = []
    for name in trainers:
        parent, child = context.Pipe()
        process = context.Process(target=trainer_process, args=(name, device, warmup, child), daemon=False)
        process.start()
        child.close()  # the child's end lives in the child only: its death is then an EOFError here
        workers.append((name, parent, process))
    try:
        rows = [{"trainer": name, **receive(name, parent, process), "seconds": []}
                for name, parent, process in workers]
        logger.info("warm-up (%d iterations each): %s", warmup,
                    ", ".join(f"{r['trainer']} {r['warmup_seconds']:.1f} s" for r in rows))
        for iteration in range(iterations):
            for row, (name, parent, process) in zip(rows, workers):
                parent.send("step")
                row["seconds"].append(receive(name, parent, process))
            logger.info("iteration %d: %s", iteration,
                        ", ".join(f"{r['trainer']} {r['seconds'][-1]:.2f} s" for r in rows))
        for row, (name, parent, process) in zip(rows, workers):
            parent.send("stop")
            row.update(receive(name, parent, process))
            process.join()
    finally:
        for _, _, process in workers:
            if process.is_alive():
                process.terminate()
                process.join()
    return rows


def table(rows: list[dict]) -> str:
    base = rows[0]
    cuda = base["peak_cuda_mib"] is not None
    header = ["trainer", "s / iteration (median)", "min", "max", "vs nnUNetTrainer", "samples / iteration",
              "samples / s", "peak RSS MiB", "vs nnUNetTrainer"]
    header += ["peak CUDA MiB", "vs nnUNetTrainer"] if cuda else []
    lines = []
    for r in rows:
        median = statistics.median(r["seconds"])
        line = [r["trainer"], f"{median:.2f}", f"{min(r['seconds']):.2f}", f"{max(r['seconds']):.2f}",
                f"{median / statistics.median(base['seconds']):.2f}x", str(r["samples"]),
                f"{r['samples'] / median:.2f}", f"{r['peak_rss_mib']:.0f}", f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x"]
        if cuda:
            line += [f"{r['peak_cuda_mib']:.0f}", f"{r['peak_cuda_mib'] / base['peak_cuda_mib']:.2f}x"]
        lines.append(line)
    return markdown_table(header, lines)


def target_lines(rows: list[dict], targets: dict[str, float] = TARGETS) -> list[str]:
    """PASS/FAIL per trainer with a target: its median iteration time against nnUNetTrainer's."""
    base = statistics.median(rows[0]["seconds"])
    lines = []
    for r in rows:
        if r["trainer"] in targets:
            ratio, limit = statistics.median(r["seconds"]) / base, targets[r["trainer"]]
            lines.append(f"- {r['trainer']} <= {limit}x nnUNetTrainer: {ratio:.2f}x -> "
                         f"{'PASS' if ratio <= limit else 'FAIL'}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--iterations", type=int, default=20, help="measured iterations per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="iterations not measured")
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 48, 48), metavar=("Z", "Y", "X"),
                        help="synthetic volume shape (nnU-Net plans the patch size from it)")
    parser.add_argument("--levers", action="store_true",
                        help="also time " + ", ".join(f"{n} ({b} with {a})" for n, (b, a) in LEVERS.items()))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.device == "cpu":  # nnU-Net's defaults start more workers than 2 cores can feed
        os.environ.setdefault("nnUNet_n_proc_DA", "1")
        os.environ.setdefault("nnUNet_def_n_proc", "2")
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.trainer_data import prepare_dataset  # synthetic dataset, fake extra cases, short trainers
    from nnunet_sam.demo.nnunet_setup import write_short_trainers

    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="nnsam-train-speed-") as tmp:
        root = Path(tmp)
        prepare_dataset(root, root / "ext_trainers", shape=tuple(args.shape))
        # the levers as subclasses of our full trainers, in a module beside the short trainers
        write_short_trainers(root / "ext_trainers", suffix="Speed", variants=LEVERS)
        rows = measure(args.device, args.warmup, args.iterations, TRAINERS + (tuple(LEVERS) if args.levers else ()))
    text = table(rows)
    targets = target_lines(rows)
    print(text)
    print("\n".join(targets))
    body = "\n".join([
        f"Machine: {machine_description(args.device)}. Load average (1 min) before/after: {load_before:.1f}/"
        f"{os.getloadavg()[0]:.1f}: the CPU is shared with other work, so seconds are indicative; the ratios "
        f"are taken under the same load (interleaved iterations). Total runtime: "
        f"{(time.perf_counter() - started) / 60:.1f} min.",
        "",
        f"Command: `.venv/bin/python benchmarks/train_speed.py --device {args.device} --iterations "
        f"{args.iterations} --warmup {args.warmup} --shape {' '.join(map(str, args.shape))}"
        f"{' --levers' if args.levers else ''}` "
        f"(nnUNet_n_proc_DA={os.environ.get('nnUNet_n_proc_DA', 'unset')}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}: torch threads per trainer process {torch.get_num_threads()}).",
        "",
        f"Data: synthetic CT-like dataset, volumes {tuple(args.shape)}, 2 labelled cases (fold `all`), planned "
        f"by nnU-Net (3d_fullres, batch size {rows[0]['batch_size']}), plus 2 unlabelled / pseudo-labelled "
        "cases. Our trainers draw nnU-Net's planned labelled batch and as many extra samples on top "
        "(`extra_batch_size`): twice the samples per iteration (see *samples / s*); the Mean Teachers add a "
        "teacher forward pass on the extra samples (their own augmented view) and an EMA update. On the CPU "
        "our trainers run the labelled batch and the extra samples through the network one after the other "
        "(`forward_in_parts`, the same outputs and gradients)"
        + ("; *nnUNetTrainerSAMPseudoOnePass* is nnUNetTrainerSAMPseudo with one pass over the whole batch "
           "(`forward_in_parts = False`), the lever's control." if args.levers else "."),
        "",
        f"Timed: {args.iterations} iterations per trainer, interleaved across the {len(rows)} trainer processes, after "
        f"{args.warmup} warm-up iterations that each process runs on its own first; an iteration = fetch the labelled batch + `train_step`. Peak RSS: "
        "the training process (VmHWM), without its data-augmentation workers.",
        "",
        text,
        "",
        *targets,
    ])
    update_results_section(SECTION, body)


if __name__ == "__main__":
    main()
