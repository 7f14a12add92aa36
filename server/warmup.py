"""Warm the front door before the port opens.

Loading a model compiles and runs its forward pass, but the first gRPC request a server answers
still pays for first calls everywhere else: gRPC's own call path, the servicer, decoding, the
batcher, encoding, and Python's adaptive interpreter, which specializes code only after it has run
a few times. Measured on the shipped model, the first client request took 4.5 to 10 times the
steady-state latency (over several runs). So before the real port opens, each model answers a few
`Predict` calls through a throwaway gRPC server on a Unix socket in a private temporary directory
(reachable by this user only, never over the network), with its own metrics, outside the batch
statistics.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable

import grpc

from rnnserve.client.tensors import to_tensor
from rnnserve.server.interceptors import MalformedRequestInterceptor
from rnnserve.server.served_model import ServedModel, warm_up_sequences
from rnnserve.v1 import inference_pb2 as pb
from rnnserve.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

CALLS = 5  # per model and warm-up length


async def warm_front_door(
    servicer: pb_grpc.InferenceServicer, models: Iterable[ServedModel]
) -> None:
    """Send each model a few Predict calls through `servicer` on a private socket. Never fatal:
    a failure only means a slower first request, so it is logged and startup goes on."""
    started = time.perf_counter()
    models = list(models)
    try:
        with tempfile.TemporaryDirectory(prefix="rnnserve-warm-") as private:  # mode 0700
            address = f"unix:{private}/grpc.sock"
            server = grpc.aio.server(interceptors=[MalformedRequestInterceptor()])
            pb_grpc.add_InferenceServicer_to_server(servicer, server)
            if not server.add_insecure_port(address):
                raise OSError(f"cannot bind {address}")
            await server.start()
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    predict = pb_grpc.InferenceStub(channel).Predict
                    for model in models:
                        with model.batcher.unobserved():
                            for x in warm_up_sequences(model):
                                request = pb.PredictRequest(
                                    model_name=model.name,
                                    model_version=model.version,
                                    sequences=[to_tensor(x)],
                                )
                                for _ in range(CALLS):
                                    await predict(request, timeout=30)
            finally:
                await server.stop(None)
    except Exception as exc:
        log.warning("front-door warm-up skipped (first requests will be slower): %s", exc)
        return
    log.info(
        "front door warmed with %d models in %.0f ms",
        len(models),
        (time.perf_counter() - started) * 1000,
    )
