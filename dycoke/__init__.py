"""DyCoke: training-free dynamic token compression for video LLMs (Tao et al., CVPR 2025)."""

__version__ = "0.1.0"
