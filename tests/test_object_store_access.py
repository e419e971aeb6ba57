"""Only SeaweedFS's S3 gateway, with the keys, reads or writes objects: a local user reaches
none through its master, volume server or filer, over HTTP or gRPC (tests/object_store_access.py
tries every socket it listens on). The keys are made at the first start and kept after."""

from __future__ import annotations

from object_store_access import assert_only_s3_with_keys_reaches_objects
from services import stoppable_seaweedfs


def test_only_the_s3_gateway_with_the_keys_reads_or_writes_objects_across_a_restart(tmp_path):
    security = tmp_path / "security"
    with stoppable_seaweedfs(tmp_path) as service:
        s3, bucket = service.server.client(), service.server.new_bucket()
        assert_only_s3_with_keys_reaches_objects(
            service.proc.pid, tmp_path, service.ports, s3, bucket
        )
        for file in security.iterdir():
            assert file.stat().st_mode & 0o777 == 0o600, file
        assert security.stat().st_mode & 0o777 == 0o700
        kept = {file.name: file.read_bytes() for file in security.iterdir()}
        service.stop()
        service.start(timeout=60.0)  # waits until the objects stored before are readable
        assert {file.name: file.read_bytes() for file in security.iterdir()} == kept
        s3.put_object(Bucket=bucket, Key="after-restart", Body=b"x")
        assert s3.get_object(Bucket=bucket, Key="after-restart")["Body"].read() == b"x"
