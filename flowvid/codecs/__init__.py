"""Latent codecs: uint8 video <-> the latent space the flow models.

Importing this package registers the built-ins ``pixel`` and ``video_vae`` in ``CODECS``.
"""

from flowvid.codecs.base import CodecMismatchError, LatentCodec, check_codec_identity
from flowvid.codecs.pixel import PixelCodec
from flowvid.codecs.video_vae import VideoVAE

__all__ = ["CodecMismatchError", "LatentCodec", "PixelCodec", "VideoVAE", "check_codec_identity"]
