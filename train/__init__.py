"""Everything that runs training: pretraining binary, data pipelines, training loop, export."""
