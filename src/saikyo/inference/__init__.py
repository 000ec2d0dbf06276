"""Framework-free inference pieces: image bytes -> pixels, dynamic batching, probabilities -> answers."""
