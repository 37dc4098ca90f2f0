"""The batch through the network in parts (`nnunet_sam.nnunet.partwise_forward`): the same outputs and gradients as
one pass for nnU-Net's U-Net, and the network swapped only where that holds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunet_sam.nnunet.partwise_forward import PartwiseForward, concat_outputs, network_in_parts, splittable
from nnunet_sam.nnunet.semi_supervised import SemiSupervisedTrainer


def _unet(norm=nn.InstanceNorm2d) -> nn.Module:
    """A small 2d U-Net built as nnU-Net builds its plans' network (deep supervision on)."""
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, [4, 8, 16], nn.Conv2d, 3, [1, 2, 2], 2, 3, 2, conv_bias=True, norm_op=norm,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)


def _outputs_and_gradients(network: nn.Module, data: torch.Tensor):
    network.zero_grad(set_to_none=True)
    outputs = network(data)
    sum((o * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum() for o in outputs).backward()
    return [o.detach() for o in outputs], [p.grad.clone() for p in network.parameters()]


def test_parts_give_the_outputs_and_gradients_of_one_pass():
    network, data = _unet(), torch.randn(4, 1, 32, 32)
    whole_out, whole_grad = _outputs_and_gradients(network, data)
    parts_out, parts_grad = _outputs_and_gradients(PartwiseForward(network, [2, 2]), data)
    assert [o.shape for o in parts_out] == [o.shape for o in whole_out]
    for a, b in zip(whole_out, parts_out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    scale = max(g.abs().max() for g in whole_grad)  # a bias before a normalisation has a gradient of ~0 (rounding)
    for a, b in zip(whole_grad, parts_grad):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)
    uneven = PartwiseForward(network, [1, 3])(data)
    torch.testing.assert_close(uneven[0], whole_out[0], rtol=1e-4, atol=1e-5)


def test_batch_statistics_are_not_split():
    assert splittable(_unet())
    assert not splittable(_unet(nn.BatchNorm2d))
    network, data = _unet(nn.BatchNorm2d), torch.randn(4, 1, 32, 32)
    whole = network(data)[0]
    assert not torch.allclose(PartwiseForward(network, [2, 2])(data)[0], whole, atol=1e-3)  # why it is refused


def test_concat_outputs_joins_tensors_and_deep_supervision_lists():
    a, b = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 2, 2)], [torch.ones(3, 2, 4, 4), torch.ones(3, 2, 2, 2)]
    joined = concat_outputs(a, b)
    assert [t.shape[0] for t in joined] == [4, 4] and joined[0][1:].min() == 1 and joined[1][:1].max() == 0
    assert concat_outputs(torch.zeros(2, 1), torch.ones(1, 1)).flatten().tolist() == [0, 0, 1]


@pytest.mark.parametrize("device, sizes, network, swapped", [
    ("cpu", [2, 2], _unet(), True),
    ("cpu", [4], _unet(), False),  # one part: nothing to split
    ("cuda", [2, 2], _unet(), False),  # one large batch is faster on CUDA (nothing runs here: no GPU needed)
    ("cpu", [2, 2], _unet(nn.BatchNorm2d), False),
])
def test_the_network_is_swapped_only_inside_the_block_and_only_where_it_holds(device, sizes, network, swapped):
    trainer = SimpleNamespace(network=network, device=torch.device(device))
    with network_in_parts(trainer, sizes):
        assert isinstance(trainer.network, PartwiseForward) is swapped
        assert trainer.network.parameters().__next__() is next(network.parameters())  # the optimizer's parameters
    assert trainer.network is network
    with pytest.raises(RuntimeError), network_in_parts(trainer, sizes):
        raise RuntimeError("a failing step")
    assert trainer.network is network


@pytest.mark.parametrize("in_parts, n_labelled, n_samples, parts", [
    (True, 2, 4, [2, 2]), (True, 2, 3, [2, 1]),
    (True, 0, 2, [2]),  # a pooled batch: nnU-Net's batch, whole
    (True, 2, 2, [2]),
    (False, 2, 4, [4]),
])
def test_the_step_runs_labelled_then_extra_samples(in_parts, n_labelled, n_samples, parts):
    trainer = SimpleNamespace(forward_in_parts=in_parts)
    assert SemiSupervisedTrainer.forward_parts(trainer, n_labelled, n_samples) == parts
