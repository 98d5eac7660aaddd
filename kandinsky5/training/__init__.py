"""LoRA training: the loop, flow matching, training states and samples during training.
May import kandinsky5.model, kandinsky5.encoders and kandinsky5.inference."""
