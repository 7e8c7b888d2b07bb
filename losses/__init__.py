"""Unsupervised losses: Noise As Targets (`nat`) and Spatial Contrasting (`spatial_contrasting`)."""
