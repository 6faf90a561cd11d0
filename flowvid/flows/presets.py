"""Named GlobalLocalFlow configurations (keyword arguments of its constructor)."""

PRESETS: dict[str, dict] = {
    # Unit tests and conformance: a few thousand parameters, unconditional.
    "tiny": dict(num_shallow=2, shallow_width=32, shallow_depth=1, deep_width=32, deep_depth=2, head_dim=16),
    # The CPU demo: trains in minutes on two cores, conditioned on the learned text encoder.
    "demo": dict(num_shallow=2, shallow_width=96, shallow_depth=2, deep_width=192, deep_depth=6, head_dim=32,
                 text_width=64),
    # A mid-size GPU configuration (0.36B parameters with 48 latent channels).
    "base": dict(num_shallow=4, shallow_width=768, shallow_depth=2, deep_width=1024, deep_depth=24, head_dim=64,
                 text_width=768),
    # STARFlow-V 7B (480p, 81 frames -> 21 x 30 x 53 x 48 Wan2.2 latents, flan-t5-xl text states):
    # five 2-layer shallow blocks at width 3072 and a 24-layer deep block at width 4096.
    "starflow-v-7b": dict(latent_channels=48, frame_size=(30, 53), num_shallow=5, shallow_width=3072,
                          shallow_depth=2, deep_width=4096, deep_depth=24, head_dim=64, text_width=2048),
}
