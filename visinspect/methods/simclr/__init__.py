"""SimCLR: contrastive self-supervised pre-training of the VGG16 backbone on unlabelled images."""
