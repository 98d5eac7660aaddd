"""What turns prompts and pixels into the DiT's inputs: Qwen2.5-VL and CLIP with the prompt
templates, and the two VAEs. May import kandinsky5.model."""
