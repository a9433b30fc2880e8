"""An in-process fake Kubernetes API server speaking kube-apiserver's wire protocol.

from tests.apiserver import FakeApiServer

with FakeApiServer() as srv:
    kubeconfig = srv.write_kubeconfig(tmp_path / "kc.yaml")
    srv.create({"kind": "Service", "metadata": {"name": "a", "namespace": "ns"}})
"""

from .errors import AlreadyExists, ApiError, Conflict, NotFound
from .records import RequestRecord
from .server import FakeApiServer, free_port

__all__ = [
    "AlreadyExists",
    "ApiError",
    "Conflict",
    "FakeApiServer",
    "NotFound",
    "RequestRecord",
    "free_port",
]
