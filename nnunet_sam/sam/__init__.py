"""SAM's side: models, prompts, views, the refinement engine and decoder fine-tuning. Knows nothing of nnU-Net,
nor of command lines (its errors name settings: `nnunet_sam.errors.SettingError`)."""

from nnunet_sam.sam.embedding_cache import EmbeddingCache
from nnunet_sam.sam.class_prompts import PROMPT_MODES, ClassPrompts
from nnunet_sam.sam.finetune import (DecoderFinetuner, FinetuneSettings, LabelledVolume, attach_class_prompts,
                                     class_prompt_dice, decoder_dice, save_finetuned, slice_examples, view_record)
from nnunet_sam.sam.models import MODEL_TYPES, SAM_MODELS, ModelSpec, SamModel, load_sam, read_checkpoint
from nnunet_sam.sam.refine import PROMPT_SETS, ClassStats, RefineResult, RefineSettings, SamRefiner

__all__ = ["MODEL_TYPES", "SAM_MODELS", "ModelSpec", "PROMPT_MODES", "PROMPT_SETS", "ClassPrompts", "ClassStats",
           "DecoderFinetuner", "EmbeddingCache", "FinetuneSettings", "LabelledVolume", "RefineResult",
           "RefineSettings", "SamModel", "SamRefiner", "attach_class_prompts", "class_prompt_dice", "decoder_dice",
           "load_sam", "read_checkpoint", "save_finetuned", "slice_examples", "view_record"]
