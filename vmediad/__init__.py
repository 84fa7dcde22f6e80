"""vmediad: an emulated mediated video-codec device shared by many guest processes."""

__version__ = "0.1.0"
