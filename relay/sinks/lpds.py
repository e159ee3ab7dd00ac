"""``lpds://host:port/queue`` — the lpd:// sink over TLS (SPEC §9).

Everything of ``lpd://`` (options, job numbering, origin ports, batches)
with a TLS handshake right after the TCP connect: the server's certificate
is verified against ``ca=`` and the host name (or ``servername=``), and with
``cert=``/``key=`` this relay shows a client certificate (mutual TLS, e.g.
towards another relay's ``listen_tls`` or an stunnel server in front of any
LPD receiver).  A failed handshake is retried like a network error; the log
line and the job's last error carry the TLS reason (expired, unknown CA,
name mismatch) and ``lpdrelay_tls_handshake_failures_total`` counts it.
"""

from __future__ import annotations

from relay import client, tls
from relay.errors import ConfigError
from relay.metrics import Metrics
from relay.sinks.base import SinkContext, register
from relay.sinks.lpd import LpdSink
from relay.uri import Destination


class LpdsSink(LpdSink):
    """LPD inside TLS to one queue."""

    def __init__(self, destination: Destination, context: SinkContext) -> None:
        super().__init__(destination, context)
        d = destination
        try:
            self.ssl_context = tls.client_context(d.tls_ca, d.tls_cert, d.tls_key)
            not_after = tls.certificate_not_after(d.tls_cert) if d.tls_cert else None
        except (OSError, ValueError) as exc:   # at start: a clear "cannot start" line
            raise ConfigError(d.uri, f"cannot load ca=, cert= or key=: {exc}") from exc
        self.server_hostname = d.servername or d.host
        self.metrics = context.metrics if isinstance(context.metrics, Metrics) else None
        if not_after is not None and self.metrics is not None:
            self.metrics.certificate_expires("client", not_after)

    def describe(self) -> str:
        return super().describe().replace("LPD ", "LPD over TLS ", 1) + (
            f" verified as {self.server_hostname}")

    async def _connect(self) -> client.Channel:
        try:
            return await super()._connect()    # client.connect: TCP, then the handshake
        except client.TlsHandshakeFailed as exc:
            if self.metrics is not None:
                self.metrics.tls_handshake_failures_total.labels(reason=exc.tls_reason).inc()
            raise


register("lpds", LpdsSink)
