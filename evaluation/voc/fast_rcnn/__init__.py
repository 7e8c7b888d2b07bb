"""Fast R-CNN (Girshick 2015) pieces for the VOC 2007 detection transfer.

    boxes      box-target encoding/decoding, clipping, flips, NMS (NumPy)
    roi_pool   RoI max-pooling on a feature map (TensorFlow)
    sampler    the foreground/background RoI sampler of a training image
    proposals  selective search, its on-disk cache, and proposal files
    model      the detector: pretrained AlexNet convs, RoI pooling, fc6/fc7, two heads
    data       training mini-batches; inference: test-time scoring and NMS

The binary is `evaluation.voc.detection`. Modules are imported on demand: `proposals` in
particular imports neither TensorFlow nor OpenCV, so its worker processes start fast.
"""
