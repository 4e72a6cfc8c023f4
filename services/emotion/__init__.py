"""Sentence emotion (7 classes) and a smoothed, gap-free emotion timeline."""
