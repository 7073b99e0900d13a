"""``diffnet`` / ``diffnet+``: DifferNet, a normalizing flow on multi-scale AlexNet features
(Rudolph et al., WACV 2021), and RegAD's DiffNet+ baseline (pre-trained, fine-tuned on the support set).

``torch_model`` (FrEIA flow, multi-scale extractor, views, scoring), ``training`` (feature pool,
the flow's training loop), ``adapter`` (:class:`DiffNet`, :class:`DiffNetPlus`). The official
code's facts, every deviation and option: ``README.md`` next to this file.
"""
