from nnunet_sam.trainers.nnUNetTrainerSAMPseudo import nnUNetTrainerSAMPseudo


class nnUNetTrainerSAMPseudoRound2(nnUNetTrainerSAMPseudo):
    """A second round of SAM pseudo-label training (CFR's re-training, repeated): the same training as
    nnUNetTrainerSAMPseudo, on pseudo labels that `nnsam_refine -d ... -tr nnUNetTrainerSAMPseudo` made from the
    first round's model of the same fold (checked before training). Its own name keeps the first round's model."""

    pseudo_labels_from = "nnUNetTrainerSAMPseudo"
