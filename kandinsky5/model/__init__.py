"""The Kandinsky 5 DiT and what it is made of (attention, RoPE, NABLA, the fp32 steps), its
checkpoints (plain and fp8) and the task presets. Imports nothing else of kandinsky5."""
