"""Model-agnostic machinery: file writing, and (as they land) fp8 quantization, block swap,
activation offload, optimizers and LR schedulers. Nothing here imports ``kandinsky5``."""
