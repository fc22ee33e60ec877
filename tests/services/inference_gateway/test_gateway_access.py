"""API keys, tenants and rate limits at the gateway: gRPC (native + KServe) and HTTP."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as kserve_pb
from tritonclient.grpc import service_pb2_grpc as kserve_grpc

from lmforge.contracts.v1 import generate_pb2, generate_pb2_grpc
from lmforge.security.api_keys import ApiKeyBook
from lmforge.testing import MemoryKeyValue
from services.inference_gateway.access import AccessControl
from services.inference_gateway.api.guard import RequireApiKey, http_guard
from services.inference_gateway.api.openai import OpenAIServer
from services.inference_gateway.api.server import GatewayServer
from services.inference_gateway.engines.process import EngineProcess
from services.inference_gateway.frontend import GenerationFrontend, Limits
from services.inference_gateway.registry import ModelRegistry

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def engine(trained_model):
    engine = EngineProcess(trained_model.path, version="v1", max_batch=4)
    yield engine
    engine.close()


def _http(port: int, path: str, key: str = "", body: dict | None = None
          ) -> tuple[int, dict, dict[str, str]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode() if body else None,
        headers={"Content-Type": "application/json",
                 **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def _generate(port: int, model: str, key: str = "") -> grpc.StatusCode:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = generate_pb2_grpc.GeneratorStub(channel)
        metadata = (("authorization", f"Bearer {key}"),) if key else None
        try:
            for _ in stub.Generate(generate_pb2.GenerateRequest(
                    model=model, prompt="Hello", max_new_tokens=2), timeout=30,
                    metadata=metadata):
                pass
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_keys_tenants_and_rate_limits(engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        book = ApiKeyBook(MemoryKeyValue())
        access = AccessControl(book, rate_per_s=1000, burst=1000, refresh_s=0.1)
        registry = ModelRegistry()
        registry.install("acme-model", engine)
        registry.assign_tenant("acme-model", "acme")
        frontend = GenerationFrontend(registry, Limits(max_new_tokens=8, max_concurrency=4,
                                                       max_queue=4, max_prompt_chars=1000))
        grpc_server = GatewayServer(frontend, host="127.0.0.1", port=0,
                                    max_message_bytes=1 << 20,
                                    interceptors=[RequireApiKey(access)])
        http = OpenAIServer(frontend, host="127.0.0.1", port=0, max_body_bytes=1 << 20,
                            middlewares=[http_guard(access)])
        await grpc_server.start(serving=True)
        port = await http.start()
        stop = asyncio.Event()
        follower = asyncio.create_task(access.follow(stop))
        g = grpc_server.port
        completion = {"model": "acme-model", "prompt": "Hi", "max_tokens": 2}
        try:
            # open while no key exists, and it says so
            await asyncio.sleep(0.2)
            assert await asyncio.to_thread(_generate, g, "acme-model") == grpc.StatusCode.OK
            assert any("serving OPENLY" in r.getMessage() for r in caplog.records)

            acme = await book.create("acme")
            globex = await book.create("globex", rate_per_s=1, burst=3)
            await asyncio.sleep(0.4)  # taken up without a restart
            assert await asyncio.to_thread(_generate, g, "acme-model") == \
                grpc.StatusCode.UNAUTHENTICATED
            assert await asyncio.to_thread(_generate, g, "acme-model", "lmf_bad") == \
                grpc.StatusCode.UNAUTHENTICATED
            assert await asyncio.to_thread(_generate, g, "acme-model", acme) == \
                grpc.StatusCode.OK
            # another tenant's model is exactly as absent as a model that does not exist
            assert await asyncio.to_thread(_generate, g, "acme-model", globex) == \
                grpc.StatusCode.NOT_FOUND
            status, body, _ = await asyncio.to_thread(_http, port, "/v1/models", globex)
            assert status == 200 and body["data"] == []
            status, body, _ = await asyncio.to_thread(_http, port, "/v1/completions", globex,
                                                      completion)
            assert status == 404 and "serving: []" in body["error"]["message"]
            # globex's bucket held 3: the 4th request at once is 429 with Retry-After
            status, body, headers = await asyncio.to_thread(_http, port, "/v1/models", globex)
            assert status == 429 and headers.get("Retry-After") == "1"
            status, body, _ = await asyncio.to_thread(_http, port, "/v1/completions", "",
                                                      completion)
            assert status == 401 and body["error"]["code"] == "invalid_api_key"
            status, body, _ = await asyncio.to_thread(_http, port, "/v1/models", acme)
            assert [m["id"] for m in body["data"]] == ["acme-model"]

            # tritonclient's headers: KServe metadata with the key, and without
            with grpc.insecure_channel(f"127.0.0.1:{g}") as channel:
                kserve = kserve_grpc.GRPCInferenceServiceStub(channel)
                ok = await asyncio.to_thread(
                    kserve.RepositoryIndex, kserve_pb.RepositoryIndexRequest(),
                    metadata=(("authorization", f"Bearer {acme}"),))
                assert [m.name for m in ok.models] == ["acme-model"]
                with pytest.raises(grpc.RpcError) as refused:
                    await asyncio.to_thread(kserve.ModelMetadata,
                                            kserve_pb.ModelMetadataRequest(name="acme-model"))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                # health stays open and tenant-neutral
                health = health_pb2_grpc.HealthStub(channel)
                answer = await asyncio.to_thread(health.Check, health_pb2.HealthCheckRequest())
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
                live = await asyncio.to_thread(kserve.ServerLive,
                                               kserve_pb.ServerLiveRequest())
                assert live.live

            # revoked: refused within a refresh, no restart
            acme_id = acme.split("_")[1]
            assert await book.revoke(acme_id)
            await asyncio.sleep(0.4)
            assert await asyncio.to_thread(_generate, g, "acme-model", acme) == \
                grpc.StatusCode.UNAUTHENTICATED
        finally:
            stop.set()
            await follower
            await http.stop()
            await grpc_server.stop(0)
        logged = "\n".join(r.getMessage() for r in caplog.records)
        for key in (acme, globex):
            assert key.split("_", 2)[2] not in logged and key not in logged

    asyncio.run(scenario())
