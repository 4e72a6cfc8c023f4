"""New music for an emotion timeline: an offline composer and a Riffusion backend."""
