"""The diffusion math, the samplers and the pipeline that turns noise into digits."""
