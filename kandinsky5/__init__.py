"""Kandinsky 5 toolkit, in wings that import downwards only: model (the DiT, its checkpoints, the
task presets) and encoders (text encoders, VAEs) at the bottom; inference, caching and training
above them; cli.py (the scripts' argument helpers), tiny.py and lora_tools.py on top."""
