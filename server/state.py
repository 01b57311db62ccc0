"""What the routes need of the running server: the engine and tokenizer once the cluster has
loaded, the served model's name and limits, the API key, the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine import Engine
from server.metrics import Metrics
from server.protocol import APIError, now
from server.tokenizer import TextTokenizer


@dataclass
class ServerState:
    """What the routes need; filled in when the cluster has loaded."""

    model_name: str
    tokenizer: TextTokenizer | None = None
    engine: Engine | None = None
    max_context: int = 0
    api_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    status: str = "loading"  # loading | ready | failed
    detail: str = "loading the model across the cluster"
    created: int = field(default_factory=now)

    def ready_engine(self) -> tuple[Engine, TextTokenizer]:
        if self.status != "ready" or self.engine is None or self.tokenizer is None:
            raise APIError(503, f"the server is not ready: {self.detail}", "service_unavailable",
                           code="not_ready", headers={"Retry-After": "5"})
        if self.engine.error:
            raise APIError(503, self.engine.error, "service_unavailable", code="cluster_unavailable",
                           headers={"Retry-After": "1"})
        return self.engine, self.tokenizer
