"""Speech to text with faster-whisper: timestamps, VAD, language detection, translation."""
