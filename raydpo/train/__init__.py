"""Training: the pure step functions (`step`) and the Ray Train worker loop (`worker`)."""
