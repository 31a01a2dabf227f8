"""vlm: a small, correct trainer for vision-language models."""
