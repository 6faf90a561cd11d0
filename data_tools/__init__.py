"""Data tools: video files -> shards -> latent shards, verification, FVD statistics."""
