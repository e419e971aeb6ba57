"""The demo data on the `neoray up` stack: its jobs read it from the stack's bucket.

A job submitted to a cluster runs in a copy of the project that leaves `runs/` behind (it holds
checkpoints and data, often gigabytes), so `data=demo` cannot mean the submitter's
`runs/data/demo` there. On the stack, `data=demo` means `s3://<bucket>/data/demo` instead
(the head's NEORAY_DEMO_DATA, read by conf/data/demo.yaml), and `neoray up` publishes the demo
data that `python jobs/preprocess.py data=demo` built in this folder to it: at the first
`neoray up` after the build, or a later one (it only uploads what is missing or differs).
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from neoray.cluster.stack import Stack, demo_data_uri, s3_client_env
from neoray.data.config import DataConfig, data_config
from neoray.data.indexed import fingerprint, token_files_exist
from neoray.data.remote import upload_token_files
from neoray.environment import temporary_environment
from neoray.storage import storage_from_uri

DEMO_CONF = os.path.join(os.path.dirname(__file__), "conf", "data", "demo.yaml")
LOCAL_ROOT = "runs/data/demo"  # where `python jobs/preprocess.py data=demo` builds it


def demo_config(root: str) -> DataConfig:
    """conf/data/demo.yaml with its files under `root`."""
    section = OmegaConf.create({"data": OmegaConf.load(DEMO_CONF)})
    section.data.root = root
    return data_config(section.data)


def publish_demo_data(stack: Stack, local_root: str = LOCAL_ROOT) -> str:
    """Upload the demo data built under `local_root` to the stack's bucket (the components and
    tokenizer not there yet, or changed since); a line saying what was done."""
    remote_root = demo_data_uri(stack)
    local = demo_config(local_root)
    built = os.path.exists(local.tokenizer) and all(
        token_files_exist(c.prefix) for c in local.components.values()
    )
    if not built:
        return (
            f"demo data: not built in {local_root}, so not in {remote_root} for the stack's "
            "jobs: run `python jobs/preprocess.py data=demo`, then `neoray up` again"
        )
    remote = demo_config(remote_root)
    uploaded = []
    with temporary_environment(**s3_client_env(stack)):
        storage, key = storage_from_uri(remote.tokenizer)
        with open(local.tokenizer, "rb") as f:
            tokenizer = f.read()
        if not storage.exists(key) or storage.get_bytes(key) != tokenizer:
            storage.put_bytes(key, tokenizer)
            uploaded.append("tokenizer")
        for name, component in local.components.items():
            uri = remote.components[name].prefix
            if not token_files_exist(uri) or fingerprint(uri) != fingerprint(component.prefix):
                upload_token_files(component.prefix, uri)
                uploaded.append(name)
    done = f"uploaded {', '.join(uploaded)}" if uploaded else "up to date"
    return f"demo data: {remote_root} ({done}), read by the stack's jobs with data=demo"
