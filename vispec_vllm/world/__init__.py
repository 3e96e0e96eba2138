"""The real-language VLM world: a real pretrained LM with a vision side trained here on synthetic scenes."""
