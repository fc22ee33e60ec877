"""Run the inference gateway: `python -m services.inference_gateway`.

settings -> model registry -> Generator servicer -> grpc.aio server (+ health,
reflection); models arrive on model.exported. SIGTERM stops it gracefully.
"""

from lmforge.service import run
from services.inference_gateway.handlers import GatewayService

run(GatewayService)
