"""Neodragon's hybrid pipeline beyond the DiT path: the first-frame image model (an SSD-1B-style
UNet with an LCM scheduler), QuickSRNet 2x super-resolution, and how they join a Pyramid-Flow
pipeline (`hybrid.py`)."""
