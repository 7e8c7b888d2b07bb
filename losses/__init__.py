"""Unsupervised losses: Noise As Targets (`nat`) and Spatial Contrasting (`spatial_contrasting`).

The names below are the settings the binaries check before TensorFlow is imported (this file
imports nothing); `losses.nat` and `losses.spatial_contrasting` define what they mean.
"""

NAT_SCOPES = ("replica", "global")
"""Where NAT solves its assignment: per replica (b x b) or over the global batch (B x B)."""
NAT_TARGETS = ("sphere", "onehot")
"""NAT's target vectors: uniform on the unit sphere (the method), or one-hot rows of the
canonical basis (the clustering-like baseline of NAT Sec. 4.1)."""
SC_POOLS = ("flatten", "avg")
"""How an SC window becomes a vector: its cells flattened, or their mean."""
