"""Generation: the pipeline, the denoiser (CFG, I2V/I2I conditioning), the sampler, MagCache,
prompt files, sizes and media files. May import kandinsky5.model and kandinsky5.encoders."""
