"""SAM's side: models, prompts, views and the refinement engine. Knows nothing of nnU-Net."""

from nnunet_sam.sam.models import MODEL_TYPES, SamModel, load_sam
from nnunet_sam.sam.refine import PROMPT_SETS, ClassStats, RefineResult, RefineSettings, SamRefiner

__all__ = ["MODEL_TYPES", "PROMPT_SETS", "ClassStats", "RefineResult", "RefineSettings", "SamModel",
           "SamRefiner", "load_sam"]
