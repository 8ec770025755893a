"""imgsvc: originals stored once, any variant rendered on demand by libvips."""

__version__ = "0.1.0"
