"""Models: one file per part (vision_encoder.py over timm, projector.py, language_model.py over transformers) and
vision_language_model.py, which wires them: image features merged into the placeholders, the tensor-only
`_forward_core` that compiles whole, `from_pretrained` / `save_pretrained`. Models never import training or
composition (vlm/build.py).
"""
