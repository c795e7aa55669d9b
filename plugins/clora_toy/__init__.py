"""The embedded default base model: a tiny Qwen-Image-Edit world built from nothing on a CPU."""
