"""Azure ML without Azure: a TLS stand-in for the ARM calls azure-ai-ml makes, and Azurite as blob storage.

What ``MLClient.models.create_or_update`` does against a real workspace, in order: GET the
latest version, GET the model container (next version), GET datastore workspaceblobstore,
POST listSecrets, blob PUTs under ``LocalUpload/<hash>/`` in the workspace's storage
account, PUT the model version. The stand-in answers the ARM part and records every
request; Azurite (npm) is a real blob service that the SDK uploads into.

Bearer tokens are refused over plain http, so both speak TLS with a certificate from a test
CA (``REQUESTS_CA_BUNDLE``). The SDK builds the blob URL ``https://<account>.blob.<storage
endpoint>`` and needs ``.blob.core.`` in it: the custom cloud's storage endpoint is
``core.localhost:<port>``. RFC 6761 reserves ``*.localhost`` for loopback, but glibc only
resolves ``localhost`` itself, so the tests map its subdomains to 127.0.0.1 in-process
(``localhost_subdomains``) instead of editing /etc/hosts.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from services import ACCOUNT, ACCOUNT_KEY, STORAGE_SUFFIX

BLOB_CONTAINER = "azureml-blobstore-standin"


# ---- certificates ----

@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path


def make_tls(folder: Path) -> Tls:
    """A test CA and a server certificate for localhost, 127.0.0.1 and the blob host."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "oliveflow test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.DNSName(f"{ACCOUNT}.blob.{STORAGE_SUFFIX}"),
             x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    tls = Tls(ca=folder / "ca.pem", cert=folder / "server.pem", key=folder / "server-key.pem")
    tls.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return tls


@contextlib.contextmanager
def localhost_subdomains(monkeypatch) -> Iterator[None]:
    """Resolve ``*.localhost`` to loopback in this process (RFC 6761), as glibc does not."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if isinstance(host, str) and host.endswith(".localhost"):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield


# ---- the ARM stand-in ----

@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: str


@dataclass
class ArmState:
    storage_endpoint: str
    requests: list[Recorded] = field(default_factory=list)
    models: dict[str, dict[str, dict]] = field(default_factory=dict)  # name -> version -> resource
    unexpected: list[str] = field(default_factory=list)
    tokens_issued: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def calls(self, method: str, pattern: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path, re.I)]


_WS = r"/subscriptions/(?P<sub>[^/]+)/resourceGroups/(?P<rg>[^/]+)/providers/Microsoft\.MachineLearningServices" \
      r"/workspaces/(?P<ws>[^/]+)"


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


class _ArmHandler(BaseHTTPRequestHandler):
    state: ArmState  # set on the subclass made per server

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, payload: dict | None = None) -> None:
        data = json.dumps(payload if payload is not None else {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", "standin")
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self, what: str) -> None:
        self._send(404, {"error": {"code": "UserError", "message": f"{what} not found"}})

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        with self.state.lock:
            self.state.requests.append(Recorded(self.command, path, parse_qs(parts.query), dict(self.headers), body))
        for pattern, method, handler in self._identity_routes():
            match = re.fullmatch(pattern, path)
            if match and method == self.command:
                handler(match, parts, body)
                return
        if not (self.headers.get("Authorization") or "").startswith("Bearer "):
            self._send(401, {"error": {"code": "AuthenticationFailed", "message": "no bearer token"}})
            return
        for pattern, method, handler in self._routes():
            match = re.fullmatch(_WS + pattern, path, re.I)
            if match and method == self.command:
                handler(match, parts, body)
                return
        self.state.unexpected.append(f"{self.command} {path}")
        self._not_found(f"{self.command} {path} (not emulated)")

    do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _handle

    def _routes(self):
        return [
            (r"/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", "GET", self._get_version),
            (r"/models/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", "PUT", self._put_version),
            (r"/models/(?P<name>[^/]+)/versions", "GET", self._list_versions),
            (r"/models/(?P<name>[^/]+)", "GET", self._get_container),
            (r"/datastores/(?P<ds>[^/]+)", "GET", self._get_datastore),
            (r"/datastores/(?P<ds>[^/]+)/listSecrets", "POST", self._list_secrets),
        ]

    def _identity_routes(self):
        """The Entra ID (AAD) endpoints a service principal's credential calls: discovery, token."""
        return [(r"/(?P<tenant>[^/]+)/v2\.0/\.well-known/openid-configuration", "GET", self._openid),
                (r"/(?P<tenant>[^/]+)/oauth2/v2\.0/token", "POST", self._token)]

    def _openid(self, m, parts, body) -> None:
        base = f"https://localhost:{self.server.server_address[1]}/{m['tenant']}"
        self._send(200, {"token_endpoint": f"{base}/oauth2/v2.0/token",
                         "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                         "issuer": f"{base}/v2.0", "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode"})

    def _token(self, m, parts, body) -> None:
        form = parse_qs(body)
        with self.state.lock:
            self.state.tokens_issued += 1
        if not form.get("client_secret"):
            self._send(400, {"error": "invalid_client", "error_description": "no client_secret"})
            return
        self._send(200, {"token_type": "Bearer", "expires_in": 3600, "ext_expires_in": 3600,
                         "access_token": "standin-token-from-entra"})

    def _versions(self, name: str) -> dict[str, dict]:
        return self.state.models.get(name, {})

    def _get_version(self, m, parts, body) -> None:
        resource = self._versions(m["name"]).get(m["version"])
        self._send(200, resource) if resource else self._not_found(f"model {m['name']}:{m['version']}")

    def _put_version(self, m, parts, body) -> None:
        payload = json.loads(body or "{}")
        resource = {"id": m.group(0) if m.group(0).startswith("/") else "/" + m.group(0),
                    "name": m["version"], "type": "Microsoft.MachineLearningServices/workspaces/models/versions",
                    # The service fills defaults the SDK relies on when reading the answer back.
                    "properties": {"flavors": {}, "isArchived": False, "isAnonymous": False,
                                   **payload.get("properties", {})},
                    "systemData": {"createdAt": _now(), "createdBy": "standin", "createdByType": "User",
                                   "lastModifiedAt": _now()}}
        with self.state.lock:
            self.state.models.setdefault(m["name"], {})[m["version"]] = resource
        self._send(201, resource)

    def _list_versions(self, m, parts, body) -> None:
        versions = list(self._versions(m["name"]).values())
        query = {k.lower(): v[0] for k, v in parse_qs(parts.query).items()}
        if "createdtime desc" in query.get("$orderby", "").lower():
            versions = versions[::-1]  # insertion order is creation order
        if "$top" in query:
            versions = versions[: int(query["$top"])]
        self._send(200, {"value": versions})

    def _get_container(self, m, parts, body) -> None:
        versions = self._versions(m["name"])
        if not versions:
            self._not_found(f"model {m['name']}")
            return
        numbers = [int(v) for v in versions if v.isdigit()]
        latest = list(versions)[-1]
        self._send(200, {"id": m.group(0), "name": m["name"],
                         "properties": {"latestVersion": latest, "nextVersion": str(max(numbers, default=0) + 1),
                                        "isArchived": False}})

    def _get_datastore(self, m, parts, body) -> None:
        self._send(200, {"id": m.group(0), "name": m["ds"],
                         "properties": {"datastoreType": "AzureBlob", "accountName": ACCOUNT,
                                        "containerName": BLOB_CONTAINER, "endpoint": self.state.storage_endpoint,
                                        "protocol": "https", "isDefault": True,
                                        "credentials": {"credentialsType": "AccountKey"}}})

    def _list_secrets(self, m, parts, body) -> None:
        self._send(200, {"secretsType": "AccountKey", "key": ACCOUNT_KEY})


class ArmStandIn:
    """A threaded HTTPS server answering the workspace's model and datastore endpoints."""

    def __init__(self, tls: Tls, storage_endpoint: str):
        self.state = ArmState(storage_endpoint=storage_endpoint)
        handler = type("Handler", (_ArmHandler,), {"state": self.state})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(tls.cert), str(tls.key))
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = f"https://localhost:{self.port}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ArmStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---- a credential for the stand-in ----

class StaticToken:
    """A TokenCredential handing out a fixed bearer token (the stand-in only checks the scheme)."""

    def __init__(self, token: str = "standin-token"):
        self._token = token

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken

        return AccessToken(self._token, int(time.time()) + 3600)

    def get_token_info(self, *scopes, options=None):
        from azure.core.credentials import AccessTokenInfo

        return AccessTokenInfo(self._token, int(time.time()) + 3600)


def cloud_metadata(arm_url: str, storage_port: int) -> dict[str, str]:
    return {"azure_portal": arm_url, "resource_manager": arm_url, "active_directory": arm_url,
            "aml_resource_id": arm_url, "storage_endpoint": f"{STORAGE_SUFFIX}:{storage_port}",
            "registry_discovery_endpoint": arm_url}
