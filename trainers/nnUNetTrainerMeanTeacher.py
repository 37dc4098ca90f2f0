from nnunet_sam.nnunet.semi_supervised import SemiSupervisedTrainer


class nnUNetTrainerMeanTeacher(SemiSupervisedTrainer):
    """Mean Teacher: supervised loss on labelled cases plus consistency between the student's and an EMA
    teacher's softmax on unlabelled cases (`nnsam_preprocess_unlabeled`), the teacher seeing its own augmented
    view of each patch. The teacher is validated and saved as the checkpoint's network weights."""

    extra_stream = "unlabeled"
    pseudo_loss_weight = 0.0
    consistency_weight = 1.0  # above 0.1 on both datasets of benchmarks/ssl_gain.py (issue 29)
