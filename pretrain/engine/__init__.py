"""The pretraining engine: distributed setup (``distributed``), optimisation (``optim``,
``schedule``), checkpoints (``checkpoint``), data order (``sampling``), the training loop
(``trainer``: :func:`~pretrain.engine.trainer.run_pretraining` is the entry point of
``tools/pretrain.py``), logging (``monitor``), validation (``validation``) and allocator settings
(``malloc``). Submodules are imported explicitly, so that ``malloc`` can run before torch loads.
"""
