from nnunet_sam.nnunet.semi_supervised import SemiSupervisedTrainer


class nnUNetTrainerSAMPseudo(SemiSupervisedTrainer):
    """Supervised training on the fold's labelled cases plus every SAM pseudo-labelled case
    (`nnsam_refine -d`). At least half of each batch is labelled; the pseudo-label loss counts half.
    Validation uses labelled cases only."""

    extra_stream = "pseudo"
    pseudo_loss_weight = 0.5
    consistency_weight = 0.0
