"""Decode batch k+1 on the GPU while batch k trains.

With ``data.decode_device: cuda`` the loader workers only read the encoded bytes of each video
(a file, or a sample of a tar shard); the training process decodes them with NVDEC.
:class:`DecodeAhead` does that one batch ahead, on a thread of its own and a CUDA stream of its
own, so that NVDEC and the colour conversion run while the training step's kernels run on the
default stream:

.. code-block:: text

    loader workers   read bytes k+2 ....... read bytes k+3 .......
    decode thread    decode k+1 (decode stream) | decode k+2 ...
    training         step k (default stream)    | step k+1 ...

At most one decoded batch waits ahead of the one being trained on (a slot is released only when
the training loop asks for the next batch), so GPU decoding costs one extra batch of uint8 frames
in GPU memory. The training stream waits for the decode stream's event before it touches a batch,
and the batch's frames are marked as used on the training stream (``Tensor.record_stream``), so
the caching allocator never hands their memory to the decoder while the step still reads it.

An exception in the decode thread (a :class:`~tsmtrain.data.loader.DataError`, a CUDA error)
reaches the training loop as the same exception at the next batch; breaking out of the loop (the
end of ``stop_after_steps``, a stop request) stops the thread within a batch, and the thread is a
daemon, so it never keeps the process alive. On the CPU (tests; ``device`` ``"cpu"``) the same
thread runs without streams.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import torch

__all__ = ["DecodeAhead"]

_DONE = object()


class DecodeAhead:
    """The batches of ``loader``, each passed through ``decode`` one batch ahead of the consumer.

    Args:
        loader: an iterable of batches (a DataLoader of encoded items); iterated afresh for each
            ``iter()`` (a persistent DataLoader's workers stay up across epochs).
        decode: ``batch -> batch``, run on the decode thread under the decode CUDA stream (e.g.
            frames ``(N, T, H, W, 3)`` uint8 decoded on the GPU from the bytes of N videos).
        device: where ``decode`` puts its tensors: a CUDA device gets a stream and events;
            ``"cpu"`` none.
        timeout_s: seconds :meth:`close` waits for the thread to finish its batch.

    Attributes:
        loader: the wrapped loader (``dataset``, ``sampler`` and ``batch_size`` are its own).
    """

    def __init__(self, loader: Iterable, decode: Callable[[dict], dict], device: str | torch.device = "cpu",
                 timeout_s: float = 30.0):
        self.loader, self.decode, self.device, self.timeout_s = loader, decode, torch.device(device), timeout_s

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):  # dataset, sampler, batch_size, ... of the DataLoader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[dict]:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        batches = iter(self.loader)  # created here: a multi-process iterator sets its signal handler in the main thread
        ready: queue.Queue = queue.Queue()
        slot, stop = threading.Semaphore(1), threading.Event()
        thread = threading.Thread(target=self._work, args=(batches, ready, slot, stop, stream),
                                  name="tsmtrain-decode-ahead", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                slot.release()  # the consumer has taken batch k: the thread may decode k+1 now
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                batch, event = item
                if event is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    for value in batch.values():
                        if isinstance(value, torch.Tensor) and value.is_cuda:
                            value.record_stream(current)
                yield batch
        finally:
            stop.set()
            slot.release()
            thread.join(self.timeout_s)

    def _work(self, batches: Iterator, ready: queue.Queue, slot: threading.Semaphore, stop: threading.Event,
              stream) -> None:
        """The decode thread: for each batch, wait for a free slot, decode it under ``stream``,
        record an event, hand it over; then :data:`_DONE`, or the exception that stopped it."""
        try:
            while True:
                slot.acquire()
                if stop.is_set():
                    return
                batch = next(batches, _DONE)
                if batch is _DONE:
                    break
                if stream is None:
                    ready.put((self.decode(batch), None))
                    continue
                with torch.cuda.stream(stream):
                    decoded = self.decode(batch)
                    event = torch.cuda.Event()
                    event.record(stream)
                ready.put((decoded, event))
        except BaseException as exc:  # handed to the consumer, which raises it
            ready.put(exc)
            return
        ready.put(_DONE)
