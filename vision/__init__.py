"""Vision-language support: image loading and preprocessing (Pillow), vision encoder, projector."""
