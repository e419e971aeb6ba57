"""Only SeaweedFS's S3 gateway, with the keys, reads or writes objects: a local user reaches
none through its master, volume server or filer, over HTTP or gRPC (tests/object_store_access.py
tries every socket it listens on). The keys are made at the first start and kept after; what
the starting shell holds (a user's own security.toml, WEED_* and AWS_* variables) changes
nothing."""

from __future__ import annotations

import boto3
import pytest
from botocore.exceptions import ClientError
from object_store_access import assert_only_s3_with_keys_reaches_objects
from services import stoppable_seaweedfs

KNOWN = "known-to-every-local-user"


def test_only_the_s3_gateway_with_the_keys_reads_or_writes_objects_across_a_restart(
    tmp_path, monkeypatch
):
    home = tmp_path / "home"
    (home / ".seaweedfs").mkdir(parents=True)
    for folder in (home, home / ".seaweedfs"):  # SeaweedFS's default search path
        (folder / "security.toml").write_text(f'[jwt.signing]\nkey = "{KNOWN}"\n')
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    # SeaweedFS would sign with this key (it wins over security.toml), and its S3 gateway would
    # take this pair as an admin identity.
    monkeypatch.setenv("WEED_JWT_SIGNING_KEY", KNOWN)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local-user")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KNOWN)
    data = tmp_path / "data"
    data.mkdir()
    security = data / "security"
    with stoppable_seaweedfs(data) as service:
        s3, bucket = service.server.client(), service.server.new_bucket()
        # It checks the volume server takes a JWT signed with the key of security.toml only.
        assert_only_s3_with_keys_reaches_objects(service.proc.pid, data, service.ports, s3, bucket)
        shells = boto3.client(
            "s3", endpoint_url=service.server.endpoint_url, region_name="us-east-1"
        )
        with pytest.raises(ClientError, match="InvalidAccessKeyId|AccessDenied"):
            shells.list_objects_v2(Bucket=bucket)
        assert security.stat().st_mode & 0o777 == 0o700
        for file in security.iterdir():
            assert file.stat().st_mode & 0o777 == 0o600, file
        kept = {file.name: file.read_bytes() for file in security.iterdir()}

        service.stop()
        service.start(timeout=60.0)  # waits until the objects stored before are readable
        assert {file.name: file.read_bytes() for file in security.iterdir()} == kept
        s3.put_object(Bucket=bucket, Key="after-restart", Body=b"x")
        assert s3.get_object(Bucket=bucket, Key="after-restart")["Body"].read() == b"x"
