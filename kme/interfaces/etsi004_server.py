"""The ETSI GS QKD 004 server of a KME: `flask --app wsgi serve-etsi004` (docs/etsi004.md).

A small TLS server on asyncio streams, for the clients of the ETSI
reference implementation's wire format (kme.interfaces.etsi004_wire): an
SAE is known by its client certificate, as on the SAE interface; a
connection carries one request or several, one after the other. Every
phase has its time (the TLS handshake, each header, each payload, each
answer: PHASE_SECONDS), at most MAX_CONNECTIONS connections are served at
once (more are closed at once), and the requests, which use the database,
run on a few threads. A frame that breaks the format closes its connection
and changes nothing.
"""
import asyncio
import logging
import signal
import ssl
from concurrent.futures import ThreadPoolExecutor

from cryptography import x509

from kme.config import KmeConfig, Sae
from kme.domain import streams
from kme.errors import KmeError
from kme.interfaces import etsi004_wire as wire
from kme.interfaces.gunicorn_conf import server_context
from kme.storage import backends

log = logging.getLogger(__name__)

PHASE_SECONDS = 10.0
MAX_CONNECTIONS = 64
# Threads that run requests on the database.
REQUEST_THREADS = 8


def serve(app, config: KmeConfig, on_ready=None) -> None:
    """Serve until SIGTERM or SIGINT; ``on_ready()`` once listening."""
    asyncio.run(_Server(app, config).run(on_ready))


class _Server:
    def __init__(self, app, config: KmeConfig):
        self.app, self.config = app, config
        self.failures = (KmeError, *backends.for_uri(config.this_kme.database_uri).DRIVER_ERRORS)
        self.executor = ThreadPoolExecutor(REQUEST_THREADS, thread_name_prefix="etsi004")
        self.connections = 0

    async def run(self, on_ready) -> None:
        interface = self.config.this_kme.etsi004_interface
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, stop.set)
        server = await asyncio.start_server(self._connection, interface.host, interface.port,
                                            ssl=server_context(interface), ssl_handshake_timeout=PHASE_SECONDS)
        log.info("ETSI GS QKD 004 server listening on %s", interface.listen_address)
        if on_ready:
            on_ready()
        async with server:
            await stop.wait()
        self.executor.shutdown(wait=True)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            writer.close()
            return
        self.connections += 1
        try:
            caller = self._caller(writer)
            if caller is None:
                log.warning("ETSI 004: a client certificate of no SAE of this KME: connection closed")
                return
            while await self._one_request(reader, writer, caller):
                pass
        except wire.WireError as exc:
            log.warning("ETSI 004: a malformed frame (%s): connection closed", exc)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, ssl.SSLError):
            pass
        finally:
            self.connections -= 1
            writer.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, caller: Sae) -> bool:
        """Read, answer and send one request; False when the client closed the connection between requests."""
        try:
            header = await asyncio.wait_for(reader.readexactly(wire.HEADER.size), PHASE_SECONDS)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise wire.WireError("a short header") from None
            return False
        version, service, length = wire.parse_header(header)
        payload = await asyncio.wait_for(reader.readexactly(length), PHASE_SECONDS)
        request = wire.parse_request(service, payload)
        answer = await asyncio.get_running_loop().run_in_executor(self.executor, self._answer, caller, request,
                                                                  version)
        writer.write(answer)
        await asyncio.wait_for(writer.drain(), PHASE_SECONDS)
        return True

    def _caller(self, writer: asyncio.StreamWriter) -> Sae | None:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        serial = x509.load_der_x509_certificate(der).serial_number if der else None
        return self.config.local_saes_by_serial.get(serial)

    def _answer(self, caller: Sae, request, version: bytes) -> bytes:
        """The answer's frame, in the request's version (in a request thread, with the app's context for the
        database)."""
        with self.app.app_context():
            try:
                return self._dispatch(caller, request, version)
            except self.failures as exc:
                # The standard has no status for a failure of the KME itself: the SAE sees "no QKD connection".
                log.error("ETSI 004 %s of SAE %s failed: %s", type(request).__name__, caller.id, exc)
                return _refusal(request, version)

    def _dispatch(self, caller: Sae, request, version: bytes) -> bytes:
        if isinstance(request, wire.OpenConnect):
            return wire.open_connect_response(version, *streams.open_connect(
                self.config, caller, request.source, request.destination, request.qos, request.ksid))
        if isinstance(request, wire.GetKey):
            return wire.get_key_response(version, *streams.get_key(self.config, caller, request.ksid, request.index,
                                                                   request.metadata_size))
        return wire.close_response(version, streams.close(self.config, caller, request.ksid))


def _refusal(request, version: bytes) -> bytes:
    if isinstance(request, wire.OpenConnect):
        return wire.open_connect_response(version, streams.NO_QKD_CONNECTION, request.qos, request.ksid)
    if isinstance(request, wire.GetKey):
        return wire.get_key_response(version, streams.NO_QKD_CONNECTION, request.index, b"", b"")
    return wire.close_response(version, streams.NO_QKD_CONNECTION)
