"""``regad`` / ``regad-l``: Registration based Few-Shot Anomaly Detection (Huang et al., ECCV 2022).

``torch_model`` (STNs, registration net, Siamese encoder / predictor, SimSiam loss), ``training``
(query / support batches, the training loop), ``adapter`` (:class:`RegAD`, :class:`RegADL`).
The official code's facts, every deviation and option: ``README.md`` next to this file.
"""
