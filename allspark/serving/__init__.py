"""allspark.serving: the ensemble on Triton Inference Server.

    write_repository(build, "repo", RepositoryOptions(target=Target.CPU))   # allspark serve BUILD --repo repo
    with TritonServer("repo") as server:                                     # allspark serve BUILD --start
        p = ServingClient(server.http_url).predict("rgb", {"image": image})  # allspark client URL ...

    repository.py   the repository layout; layouts.py which models each serving layout writes
                    (one class per layout); model_config.py the config.pbtxt of every model (Triton's
                    own protobuf); options.py typed options; models/ the python-backend models;
    batching.py     how the python models merge what the dynamic batcher queued; server.py the
                    server process; client.py the client; bench.py `allspark bench serve`.

Names resolve lazily: the python-backend stubs import `allspark.serving.models.*` and must not pay
for tritonclient or the runtime they do not use.
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "write_repository": "repository", "read_repository": "repository", "RepositoryError": "repository",
    "RepositoryOptions": "options", "BatchingOptions": "options", "TensorRTOptions": "options", "Target": "options",
    "TritonServer": "server", "ServerOptions": "server", "ServerError": "server",
    "ServingClient": "client", "ServingError": "client", "StreamEvent": "client",
}

__all__ = ["BatchingOptions", "RepositoryError", "RepositoryOptions", "ServerError", "ServerOptions",
           "ServingClient", "ServingError", "StreamEvent", "Target", "TensorRTOptions", "TritonServer",
           "read_repository", "write_repository"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
