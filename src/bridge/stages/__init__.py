"""One module per step of the method; each exposes ``run(ctx) -> summary dict``.

The pipeline (:mod:`bridge.pipeline`) calls them in order; each reads the outputs of earlier
stages from the run directory by example id and writes its own folder.
"""
