"""nnU-Net trainers of nnunet-sam. Point nnU-Net here: ``export nnUNet_extTrainer=$(nnsam_trainer_dir)``.

nnU-Net imports every module of this folder as a top-level module while it searches for a trainer,
so this folder holds only the trainer modules; their machinery is `nnunet_sam.nnunet.semi_supervised`.
"""
