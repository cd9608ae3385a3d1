"""Bytes of preview files: JPEG for images, H.264 mp4 (PyAV) and animated WebP for videos."""

from __future__ import annotations

import io
from fractions import Fraction
from typing import Any


def jpeg_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def mp4_bytes(frames: list[Any], fps: int) -> bytes:
    """H.264 (yuv420p, so every player opens it); odd sizes are padded by one pixel."""
    import av
    import numpy as np

    width, height = frames[0].size
    even_w, even_h = width + width % 2, height + height % 2
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(int(fps), 1))
        stream.width, stream.height, stream.pix_fmt = even_w, even_h, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            array = np.zeros((even_h, even_w, 3), dtype=np.uint8)
            array[:height, :width] = np.asarray(frame.convert("RGB"))
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def webp_bytes(frames: list[Any], fps: int) -> bytes:
    buffer = io.BytesIO()
    rgb = [f.convert("RGB") for f in frames]
    rgb[0].save(
        buffer, format="WEBP", save_all=True, append_images=rgb[1:],
        duration=max(1, round(1000 / int(fps))), loop=0, quality=90,
    )
    return buffer.getvalue()
