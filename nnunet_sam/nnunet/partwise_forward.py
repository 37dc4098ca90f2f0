"""A training batch through the network in parts: the labelled samples, then the extra ones.

Our trainers' steps carry nnU-Net's planned batch plus as many extra samples, and on the CPU a U-Net step over twice
the samples costs more than twice as much. Run part by part, each convolution works on the smaller part's tensors:
nnUNetTrainerSAMPseudo's step costs 1.97x nnUNetTrainer's for twice the samples, against 2.53x in one pass
(benchmarks/RESULTS.md, *Trainer speed*). Where every sample is normalised on its own (nnU-Net's instance
normalisation) the outputs, the loss and the gradients are those of one pass over the whole batch. On CUDA one
large batch is the faster one, and a network with batch statistics (batch normalisation) or wrapped for
distributed training is never split.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence, Union

import torch
from torch import nn

__all__ = ["Outputs", "concat_outputs", "PartwiseForward", "splittable", "network_in_parts"]

Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]  # one tensor, or one per deep-supervision scale


def concat_outputs(*parts: Outputs) -> Outputs:
    """Batches (tensors, or deep-supervision lists of the same length) joined along the batch axis."""
    if isinstance(parts[0], (list, tuple)):
        return [torch.cat(scale) for scale in zip(*parts)]
    return torch.cat(parts)


class PartwiseForward(nn.Module):
    """`network` on consecutive parts of the batch (`sizes` samples each), its outputs joined."""

    def __init__(self, network: nn.Module, sizes: Sequence[int]) -> None:
        super().__init__()
        self.network = network
        self.sizes = list(sizes)

    def forward(self, data: torch.Tensor) -> Outputs:
        return concat_outputs(*(self.network(part) for part in torch.split(data, self.sizes)))


def splittable(network: nn.Module) -> bool:
    """Whether running `network` part by part gives the outputs of one pass: no batch statistics, no DDP."""
    if isinstance(network, nn.parallel.DistributedDataParallel):
        return False
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules())


@contextmanager
def network_in_parts(trainer, sizes: Sequence[int]) -> Iterator[None]:
    """Within the block `trainer.network` runs on the parts `sizes` of its batch (CPU only, where `splittable`)."""
    whole = trainer.network
    if len(sizes) < 2 or trainer.device.type != "cpu" or not splittable(whole):
        yield
        return
    trainer.network = PartwiseForward(whole, sizes)
    try:
        yield
    finally:
        trainer.network = whole
