"""The TensorFlow Serving contract, both sides: the SavedModel export and its clients."""
