"""Transfer evaluation: frozen features and their classifiers, probes, fine-tuning, figures,
and PASCAL VOC 2007 classification and detection (`evaluation.voc`)."""
