"""Video streams for `tta stream`: frame sources that read ahead, and labelled drifting test streams."""

from tta_cli.stream.make import StreamData, StreamLabels, load_stream_labels, make_stream, make_stream_command, read_labels, save_stream
from tta_cli.stream.sources import FrameSource, Pacer, fit_square, open_frames

__all__ = [
    "FrameSource",
    "Pacer",
    "StreamData",
    "StreamLabels",
    "fit_square",
    "load_stream_labels",
    "make_stream",
    "make_stream_command",
    "open_frames",
    "read_labels",
    "save_stream",
]
