from nnunet_sam.nnunet.semi_supervised import SemiSupervisedTrainer


class nnUNetTrainerSAMPseudoMeanTeacher(SemiSupervisedTrainer):
    """CFR's re-training: labelled and SAM pseudo-labelled supervision plus Mean Teacher consistency on
    the pseudo-labelled cases. The teacher is validated and saved as the checkpoint's network weights."""

    extra_stream = "pseudo"
    pseudo_loss_weight = 0.5
    consistency_weight = 0.1
