"""Shared by the benchmarks: describe the machine and replace one section of benchmarks/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
_HEADER = "# Benchmark results\n\nEach section is rewritten by the benchmark named in its heading.\n"


def machine_description(device: str) -> str:
    """CPU model and cores, torch version, and the GPU when the device is CUDA."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, device {device}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f" ({torch.cuda.get_device_name()})"
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with one header row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def update_results_section(title: str, body: str, results: Path = RESULTS) -> None:
    """Write `## title` with `body` into `results` (RESULTS.md), replacing that section if present."""
    text = results.read_text() if results.exists() else _HEADER
    stamp = datetime.date.today().isoformat()
    section = f"## {title}\n\n_Run on {stamp}._\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    tmp = results.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(results)
