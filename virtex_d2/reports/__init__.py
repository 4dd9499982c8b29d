"""Reports from what the pipeline's stages wrote: downstream tables and curves, pretraining curves
and example captions. Nothing is recomputed."""
