"""What a local user without the keys can do to a running SeaweedFS: every socket its processes
listen on (found from the processes, not from the ports we asked for), TCP and Unix, is tried
with HTTP reads and writes the way SeaweedFS's own clients make them and with gRPC calls that
read or write objects, with no credentials and with TLS but no client certificate.

Positive controls show that the refusals are the credentials' doing: the volume server stores
and serves a file for a JWT signed with the stack's key, and each gRPC port answers a call
made with the stack's certificate.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import socket
import time
from pathlib import Path

import grpc
import psutil
import tomllib

from neoray.cluster.services import GRPC_OFFSET
from neoray.cluster.weed_security import CA, CERT, KEY, SECURITY_TOML

# gRPC methods that read or write objects, hand out file ids or grant S3 access, by server.
OBJECT_METHODS = (
    "/master_pb.Seaweed/Assign",
    "/master_pb.Seaweed/LookupVolume",
    "/filer_pb.SeaweedFiler/LookupDirectoryEntry",
    "/filer_pb.SeaweedFiler/ListEntries",
    "/filer_pb.SeaweedFiler/CreateEntry",
    "/filer_pb.SeaweedFiler/AssignVolume",
    "/volume_server_pb.VolumeServer/ReadNeedleBlob",
    "/volume_server_pb.VolumeServer/WriteNeedleBlob",
    "/s3_pb.SeaweedS3/PutIdentity",  # would add an S3 identity of the caller's choosing
)


def listening(pgid: int) -> tuple[set[int], set[str]]:
    """The TCP ports and Unix socket paths that processes of group `pgid` listen on."""
    ports: set[int] = set()
    paths: set[str] = set()
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) != pgid:
                continue
            for connection in process.net_connections("inet"):
                if connection.status == psutil.CONN_LISTEN:
                    ports.add(connection.laddr.port)
            for connection in process.net_connections("unix"):
                if connection.laddr and not connection.raddr and Path(connection.laddr).exists():
                    paths.add(connection.laddr)
        except (ProcessLookupError, psutil.Error):
            continue
    return ports, paths


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(self.socket_path)


def http_request(
    where: int | str, method: str, path: str, body: bytes | None = None, token: str = ""
) -> tuple[int | None, bytes]:
    """Status and body of one HTTP/1.1 request to 127.0.0.1:`where` (a port) or the Unix
    socket `where`; status None when the server does not speak HTTP/1.1 there."""
    if isinstance(where, int):
        connection = http.client.HTTPConnection("127.0.0.1", where, timeout=5)
    else:
        connection = _UnixConnection(where)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None, b""
    finally:
        connection.close()


def grpc_code(where: int | str, method: str, credentials=None) -> grpc.StatusCode:
    """The status of one gRPC call (an empty request) to `method` at 127.0.0.1:`where` or the
    Unix socket `where`: plaintext, or over TLS with `credentials`."""
    target = f"127.0.0.1:{where}" if isinstance(where, int) else f"unix:{where}"
    options = [("grpc.ssl_target_name_override", "localhost")]
    if credentials is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, credentials, options)
    with channel:
        try:
            channel.unary_unary(method)(b"", timeout=5)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def volume_jwt(key: str, fid: str) -> str:
    """An HS256 JWT for file `fid`, as the master signs them for the volume server."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    claims = part(json.dumps({"fid": fid, "exp": int(time.time()) + 60}).encode())
    signature = hmac.new(key.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{part(signature)}"


def assert_only_s3_with_keys_reaches_objects(
    pgid: int, directory: Path, ports: dict[str, int], s3, bucket: str
) -> None:
    """SeaweedFS of process group `pgid` with data in `directory`, servers at `ports` (by
    role) and the S3 client `s3` with the keys: whatever listens refuses reads and writes
    without credentials, and nothing written without them appears in `bucket`."""
    secret = os.urandom(16).hex().encode()
    s3.put_object(Bucket=bucket, Key="checkpoint/manifest.json", Body=secret)
    security = directory / "security"
    config = tomllib.loads((security / SECURITY_TOML).read_text())

    # A file on a volume that exists (named <collection>_<id>.dat), written with the stack's
    # key through the volume server's HTTP port: it stores and serves for a signed request.
    volume_id = min(int(dat.stem.rpartition("_")[2]) for dat in directory.glob("*.dat"))
    fid = f"{volume_id},{os.urandom(8).hex()}{os.urandom(4).hex()}"
    write, read = config["jwt"]["signing"]["key"], config["jwt"]["signing"]["read"]["key"]
    signed_write = volume_jwt(write, fid)
    assert http_request(ports["volume"], "PUT", f"/{fid}", secret, signed_write)[0] == 201
    assert http_request(ports["volume"], "GET", f"/{fid}", token=volume_jwt(read, fid)) == (
        200,
        secret,
    )

    tcp, unix = listening(pgid)
    assert set(ports.values()) | {port + GRPC_OFFSET for port in ports.values()} <= tcp, tcp
    assert unix, "no Unix sockets found: SeaweedFS serves gRPC on some in /tmp"
    key = "checkpoint/manifest.json"
    reads = [f"/buckets/{bucket}/{key}", f"/{bucket}/{key}", f"/{fid}"]
    reads += ["/dir/assign", "/vol/status", "/dir/lookup?volumeId=1", "/cluster/status"]
    writes = [f"/buckets/{bucket}/planted", f"/{bucket}/planted", f"/{fid}", "/submit"]
    answered = []
    for where in sorted(tcp) + sorted(unix):
        for method, path in [("GET", p) for p in reads] + [
            (m, p) for p in writes for m in ("PUT", "POST")
        ]:
            status, body = http_request(where, method, path, b"planted")
            answered.append((where, method, path, status))
            assert status is None or status >= 400 or path == "/cluster/status", answered[-1]
            assert secret not in body and b'"fid"' not in body
        for method in OBJECT_METHODS:
            assert grpc_code(where, method) != grpc.StatusCode.OK, (where, method)
    assert http_request(ports["volume"], "GET", f"/{fid}")[0] == 401  # exists, and refused

    # Every gRPC server (TCP, and its Unix socket in /tmp) refuses a plaintext connection or
    # TLS without a client certificate before any method runs, and answers one with the
    # stack's certificate.
    ca, cert, tls_key = ((security / name).read_bytes() for name in (CA, CERT, KEY))
    no_client_cert = grpc.ssl_channel_credentials(ca)
    owner = grpc.ssl_channel_credentials(ca, tls_key, cert)
    grpc_servers = [port + GRPC_OFFSET for port in ports.values()]
    grpc_servers += [path for path in unix if "-grpc-" in path]
    assert len(grpc_servers) == 8, grpc_servers
    for where in grpc_servers:
        for method in OBJECT_METHODS:
            assert grpc_code(where, method) == grpc.StatusCode.UNAVAILABLE, (where, method)
            refused = grpc_code(where, method, no_client_cert)
            assert refused == grpc.StatusCode.UNAVAILABLE, (where, method)
        unknown = grpc_code(where, "/neoray.Probe/Nothing", owner)
        assert unknown == grpc.StatusCode.UNIMPLEMENTED, (where, unknown)

    listed = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert listed == [key], listed
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == secret
