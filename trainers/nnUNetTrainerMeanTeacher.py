from nnunet_sam.nnunet.semi_supervised import SemiSupervisedTrainer


class nnUNetTrainerMeanTeacher(SemiSupervisedTrainer):
    """Mean Teacher: supervised loss on labelled cases plus consistency between the student's and an EMA
    teacher's softmax on unlabelled cases (`nnsam_preprocess_unlabeled`). The teacher is validated
    and saved as the checkpoint's network weights."""

    extra_stream = "unlabeled"
    pseudo_loss_weight = 0.0
    consistency_weight = 0.1
