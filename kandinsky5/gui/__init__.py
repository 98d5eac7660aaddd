"""The web UI (kandinsky5_gui.py): gradio pages over the same functions the scripts call."""
