"""LoRA networks for the Kandinsky 5 DiT (``networks.lora_kandinsky`` arrives with the training issue)."""
