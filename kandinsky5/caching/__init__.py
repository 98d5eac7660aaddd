"""Dataset caching: latents through the VAE and text through the encoders.
May import kandinsky5.model, kandinsky5.encoders and kandinsky5.inference."""
