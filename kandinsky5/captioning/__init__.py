"""Captioning a dataset's images and videos with Qwen2.5-VL (kandinsky5_caption.py and the web UI)."""
