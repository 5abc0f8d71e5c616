"""Distillation of DSLA layers: data, losses, layer order, the chained training loop."""
