"""The bundled testbed: a small class-conditional DiT trained on Fashion-MNIST, and its FID classifier."""
