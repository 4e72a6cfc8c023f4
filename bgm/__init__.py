"""bgm: background music that follows the emotion of a video's speech.

This package is the shared library every service uses: generated contracts (``bgm.v1``),
server bootstrap, settings, logging, errors, chunking, media and model helpers.
"""
