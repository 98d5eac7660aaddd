"""The trainable networks for the Kandinsky 5 DiT (LoRA, LoHa, LoKr, with DoRA) and the adapter files we read."""
