"""Kandinsky 5 model family: task presets, the DiT, attention backends and checkpoint loading."""
