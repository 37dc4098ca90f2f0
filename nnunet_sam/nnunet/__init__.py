"""nnU-Net's side: cases, datasets, preprocessing, prediction and pseudo labels."""
