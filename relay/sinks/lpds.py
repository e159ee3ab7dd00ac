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

import ssl

import trio

from relay import client, tls
from relay.errors import ConfigError, SinkUnavailable
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
        ch = await super()._connect()
        d = self.destination
        stream = tls.TlsStream.wrap(ch.sock, self.ssl_context, server_hostname=self.server_hostname)
        try:
            with trio.fail_after(d.timeout):
                await stream.handshake()
        except (OSError, trio.TooSlowError) as exc:
            await ch.aclose()
            raise self._failed(exc) from None
        except BaseException:
            await ch.aclose()
            raise
        ch.io = stream
        return ch

    def _failed(self, exc: BaseException) -> SinkUnavailable:
        d = self.destination
        if isinstance(exc, trio.TooSlowError):
            reason, why = "other", f"timed out after {d.timeout:g}s"
        else:
            reason, why = tls.failure_reason(exc), tls.describe_failure(exc)
        if self.metrics is not None:
            self.metrics.tls_handshake_failures_total.labels(reason=reason).inc()
        retry = "timeout" if isinstance(exc, trio.TooSlowError) else (
            "other" if isinstance(exc, ssl.SSLError) else "reset")
        return SinkUnavailable(f"{d.host}:{d.port}: TLS handshake failed ({reason}): {why}",
                               reason=retry)


register("lpds", LpdsSink)
