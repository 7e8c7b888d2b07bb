"""Transfer evaluation: labelled datasets, linear/MLP probes on frozen features, fine-tuning."""
