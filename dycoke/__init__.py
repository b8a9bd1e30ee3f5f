"""DyCoke: training-free dynamic token compression for video LLMs (Tao et al., CVPR 2025)."""

__version__ = "0.1.0"

# The model that needs no download: the CLI's default and the app's fallback (assets/models/tiny).
OFFLINE_DEFAULT = "tiny"
