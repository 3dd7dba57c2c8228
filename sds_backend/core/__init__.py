"""The library: the morphable model's tensors, the renderer, SDS guidance, the fit loop, checkpoints
and exports. torch is imported by the modules that use it, not here."""
