"""harmonica: learned feature caching for Diffusion Transformers."""
