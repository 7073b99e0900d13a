"""Building blocks of models, shared by methods (timm's ``layers/``): anomaly-map operations,
augmentation and affine warps, the per-position Gaussian, torchvision backbones, CLIP loading, the
frozen-feature cache.
"""
