"""virtex-d2's pipeline and reports, above both libraries.

``pretrain`` (captioning pretraining, no detectron2) and ``detectron2_ext`` (what plugs into
detectron2) do not know this package; it knows both: :mod:`virtex_d2.pipeline` runs the
project's stages (``make demo``), :mod:`virtex_d2.reports` reads what they wrote, and
:mod:`virtex_d2.cli` holds what every command-line tool shares.
"""
