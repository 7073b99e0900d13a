"""``tdg`` / ``tdg+``: hierarchical transformation-discriminating generative model (Sheynin et al.,
ICCV 2021) and RegAD's aggregated variant. ``torch_model`` (nets, transformations, CLAHE, scoring),
``training`` (scale-by-scale training), ``adapter`` (``TDG``, ``TDGPlus``); facts from the official
code, deviations and options: ``README.md``."""
