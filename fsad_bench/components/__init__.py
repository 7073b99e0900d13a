"""Building blocks of models, shared by methods (timm's ``layers/``): anomaly-map operations,
affine maths and warps, support augmentation, the per-position Gaussian, torchvision backbones,
CLIP loading, the frozen-feature cache.
"""
