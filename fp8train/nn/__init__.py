"""FP8 layers: the FP8 linear layer, the compressed non-linear ops and the precision-flow wiring."""
