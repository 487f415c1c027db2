"""`agd train`: settings -> setup -> data -> step -> loop -> checkpoints and outputs."""
