"""Separation (keep the speech) and mixing new music under it, muxed into the video."""
