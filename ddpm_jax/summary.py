"""TensorBoard event files for training scalars and sample images, without TensorFlow.

The records are made by the ``tensorboard`` package: its ``RecordWriter`` frames them (length,
masked CRC-32C, data, masked CRC-32C) and its protocol buffers hold them. Scalars are
``simple_value`` summaries; a batch of images is one image-plugin summary per tag (a string
tensor ``[width, height, png_0, png_1, ...]``, what ``tf.summary.image`` writes), PNG-encoded
with Pillow. TensorBoard and ``tf.compat.v1.train.summary_iterator`` read both.

tensorboard's ``EventFileWriter`` is not used: it creates directories and files through
``tensorboard.compat.tf``, which imports TensorFlow whenever it is installed (about 5 s and
several hundred MB in every training process, which otherwise imports TensorFlow only for tfds
data). Here the file is a plain Python file, written and flushed on each call.
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Mapping

import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.image import metadata as image_metadata
from tensorboard.summary.writer.record_writer import RecordWriter
from tensorboard.util import tensor_util


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _image_value(tag: str, images: np.ndarray) -> summary_pb2.Summary.Value:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"images[{tag!r}] must be uint8 [N, H, W, C] with C in (1, 3, 4); got "
            f"{images.dtype} {images.shape}."
        )
    height, width = images.shape[1:3]
    content = [str(width).encode(), str(height).encode(), *(_png(im) for im in images)]
    return summary_pb2.Summary.Value(
        tag=tag,
        metadata=image_metadata.create_summary_metadata(display_name=tag, description=""),
        tensor=tensor_util.make_tensor_proto(content),
    )


class SummaryWriter:
    """Appends summaries to one ``events.out.tfevents.*`` file in logdir."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._writer = RecordWriter(open(self.path, "ab"))  # closed in close()
        self._add(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _add(self, event: event_pb2.Event) -> None:
        self._writer.write(event.SerializeToString())
        self._writer.flush()

    def _summary(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        self._add(event_pb2.Event(
            wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
        ))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Writes the scalars at step and flushes."""
        self._summary(step, [
            summary_pb2.Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()
        ])

    def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """Writes each uint8 [N, H, W, C] batch (C = 1, 3 or 4) as one image summary; flushes."""
        self._summary(step, [_image_value(tag, batch) for tag, batch in images.items()])

    def close(self) -> None:
        if not self._writer.closed:
            self._writer.close()
