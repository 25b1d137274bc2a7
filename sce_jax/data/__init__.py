"""Input pipelines: host crops (tf.data or grain) and accelerator colour augmentations."""
