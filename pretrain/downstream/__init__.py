"""Evaluation of pretrained models beyond detection: how checkpoints are scored and inspected.

* :mod:`~pretrain.downstream.features`: a frozen visual backbone from a checkpoint (ours or an
  official VirTex one) or random init, and batched global-average-pooled feature extraction;
* :mod:`~pretrain.downstream.voc07`: the VOC07 linear-SVM protocol used to select checkpoints;
* :mod:`~pretrain.downstream.linear_probe`: a linear classifier on frozen features of an
  ImageFolder dataset (the ImageNet protocol);
* :mod:`~pretrain.downstream.caption_eval`: decoding a caption split and scoring it;
* :mod:`~pretrain.downstream.attention`: the decoder's cross-attention per generated word,
  rendered as heat-maps (PNG grid and HTML page).

The command-line entry points are ``tools/clf_voc07.py``, ``tools/clf_linear.py``,
``tools/eval_captioning.py`` and ``tools/visualize_attention.py``.
"""
