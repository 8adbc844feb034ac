"""Layers of the DeepSeek-V3 model, one idea per file."""
