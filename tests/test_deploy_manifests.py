"""The Kubernetes manifests (deploy/), offline, in well under a minute once checkov is cached:

- every overlay (cpu, gpu, loadtest) rendered with `kubectl kustomize`;
- every rendered resource validated by kubernetes-validate --strict against two pinned Kubernetes
  versions, where a resource it has no schema for fails (the tool itself only warns for one);
- checkov over the overlays as a release renders them (images pinned by digest), failing on any
  failed check but the commented allowances below, each scoped to the resources it is for;
- cross-checks of our own: selectors against pod labels, Service target ports against container
  ports, probes against the probe server's paths, the HPA's target, the security context of every
  pod, the grace period against BentoML's drain, SUITE_* names against the serving configuration,
  and the load test against the suite's Service and its bounded profile.

Each validator is also shown a bad manifest, so a test that passes is one that could have failed.
That the CPU Deployment's pod really serves is tests/test_image.py's `podman kube play`."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from services.config import ServingConfig
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None,
                                reason="kubectl is not installed: it renders the kustomize overlays (`kubectl kustomize`)")
BIN = Path(sys.executable).parent
DEPLOY = REPO / "deploy"
OVERLAYS = ("overlays/cpu", "overlays/gpu", "overlays/own-models", "overlays/grpc-probes", "overlays/keda",
            "overlays/scale-to-zero", "loadtest", "batch")
SUITE_OVERLAYS = ("overlays/cpu", "overlays/gpu", "overlays/own-models", "overlays/grpc-probes", "overlays/keda",
                  "overlays/scale-to-zero")
# Custom resources: kubernetes-validate carries Kubernetes' own kinds only, so these are validated
# against their CRDs' schemas, vendored as strict JSON schema (deploy/schemas/crd_to_json_schema.py).
CUSTOM_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): DEPLOY / "schemas/keda-2.20.2-scaledobject-v1alpha1.json",
                  ("http.keda.sh/v1alpha1", "HTTPScaledObject"):
                      DEPLOY / "schemas/keda-http-0.15.0-httpscaledobject-v1alpha1.json"}
# kubernetes-validate 1.37.0 ships schemas for 1.25 to 1.37. 1.37 is the newest; 1.33 is the oldest
# minor that managed clusters still commonly run (extended support), and every field we use exists there.
KUBERNETES_VERSIONS = ("1.33.0", "1.37.0")
# checkov cannot share the suite's environment (deploy/checkov-constraints.txt says why), so uv runs
# it in one of its own, with its whole dependency set pinned.
CHECKOV = "checkov==3.3.30"
CHECKOV_CONSTRAINTS = DEPLOY / "checkov-constraints.txt"
RELEASE_DIGEST = "sha256:" + "0" * 64  # how a release names its images (deploy/README.md)
SUITE = "Deployment.model-suite.model-suite"  # checkov's name for the suite's Deployment
# The checks allowed to fail: check ID -> (the resources it may fail on, a glob, and why).
CHECKOV_ALLOWED = {
    # The suite's image runs as BentoML's own user, uid 1034, which owns the bento and its model
    # folders (mode 0700): another uid, even a "high" one, could not read them.
    "CKV_K8S_40": ("*.model-suite.model-suite*", "uid 1034 is the image's owner of its model folders (the "
                                                 "suite's Deployment and the batch Job, both on its image)"),
    # The API key is an optional Secret (off until it exists), which only an environment variable
    # can be: a missing SUITE_API_KEY_FILE stops the suite. deploy/README.md shows the file variant.
    "CKV_K8S_35": (SUITE, "optional API key: only an env var can be optional"),
}


def render(overlay: str | Path) -> list[dict]:
    folder = overlay if isinstance(overlay, Path) else DEPLOY / overlay
    out = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def documents() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def rendered(documents, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("rendered")
    files = {}
    for overlay, docs in documents.items():
        files[overlay] = folder / (overlay.replace("/", "-") + ".yaml")
        files[overlay].write_text(yaml.safe_dump_all([d for d in docs if custom_schema(d) is None]))
    return files


def custom_schema(document: dict) -> Path | None:
    return CUSTOM_SCHEMAS.get((document["apiVersion"], document["kind"]))


def test_custom_resources_pass_their_crd_schemas(documents):
    import json

    import jsonschema

    checked = 0
    for overlay, docs in documents.items():
        for document in docs:
            schema = custom_schema(document)
            if schema is not None:
                jsonschema.validate(document, json.loads(schema.read_text()))
                checked += 1
    assert checked >= 2
    schema = json.loads(CUSTOM_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")].read_text())
    (scaled,) = [d for d in documents["overlays/keda"] if d["kind"] == "ScaledObject"]
    with pytest.raises(jsonschema.ValidationError):  # strict: an unknown field is refused
        jsonschema.validate({**scaled, "spec": {**scaled["spec"], "pollInterval": 5}}, schema)


# ---- kubernetes-validate ---------------------------------------------------------------------------

def kubernetes_validate(files: list[Path], version: str) -> tuple[list[str], list[str]]:
    """(resources passed, problems): every line kubernetes-validate prints that is not a pass is a
    problem, its WARN for a kind without a schema (exit status 0) included."""
    result = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", version, *map(str, files)],
                            capture_output=True, text=True, timeout=120)
    lines = (result.stdout + result.stderr).splitlines()
    passed = [line for line in lines if line.startswith("INFO ") and " passed for resource " in line]
    problems = [line for line in lines if line not in passed]
    if result.returncode != 0 and not problems:
        problems.append(f"exit status {result.returncode}")
    return passed, problems


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_resource_passes_strict_schema_validation(documents, rendered, version):
    passed, problems = kubernetes_validate(list(rendered.values()), version)
    assert not problems, "\n".join(problems)
    assert len(passed) == sum(custom_schema(d) is None for docs in documents.values() for d in docs), passed
    assert all(f"against version {version.rsplit('.', 1)[0]}" in line for line in passed)


def test_schema_validation_fails_an_unknown_kind_and_an_unknown_field(tmp_path):
    unknown_kind = tmp_path / "crd.yaml"
    unknown_kind.write_text("apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: w}\n")
    unknown_field = tmp_path / "typo.yaml"
    unknown_field.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n"
                             "spec: {ports: [{port: 80, targetport: http}]}\n")
    for bad, expected in ((unknown_kind, "Couldn't find schema"), (unknown_field, "'targetport' was unexpected")):
        passed, problems = kubernetes_validate([bad], KUBERNETES_VERSIONS[0])
        assert not passed and any(expected in line for line in problems), problems


# ---- checkov ---------------------------------------------------------------------------------------

def render_release(overlay: str, folder: Path) -> list[dict]:
    """The overlay as a release renders it: a kustomization on top that pins every image by digest
    (`kustomize edit set image name@sha256:...`, as deploy/README.md says)."""
    images = {c["image"].rsplit(":", 1)[0] for _, pod in pod_templates(render(overlay)) for c in containers(pod)}
    folder.mkdir(parents=True)
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(DEPLOY / overlay, folder)],  # kustomize refuses absolute paths
        "images": [{"name": name, "digest": RELEASE_DIGEST} for name in sorted(images)]}))
    return render(folder)


def canary() -> dict:
    """A pod that breaks the rules checkov is there to catch: root, privileged, a writable root."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "canary", "namespace": "canary"},
            "spec": {"containers": [{"name": "c", "image": f"canary@{RELEASE_DIGEST}", "imagePullPolicy": "Always",
                                     "securityContext": {"privileged": True, "runAsUser": 0,
                                                         "allowPrivilegeEscalation": True}}]}}


def test_checkov_finds_nothing_beyond_the_commented_allowances(tmp_path):
    scanned = tmp_path / "scanned"
    scanned.mkdir()
    for overlay in OVERLAYS:
        docs = render_release(overlay, tmp_path / "release" / overlay)
        assert all("@sha256:" in c["image"] for _, pod in pod_templates(docs) for c in containers(pod))
        (scanned / (overlay.replace("/", "-") + ".yaml")).write_text(yaml.safe_dump_all(docs))
    (scanned / "canary.yaml").write_text(yaml.safe_dump(canary()))

    result = subprocess.run([str(BIN / "uv"), "tool", "run", "--quiet", "--python", sys.executable,
                             "--from", CHECKOV, "--constraints", str(CHECKOV_CONSTRAINTS), "checkov",
                             "--directory", str(scanned), "--framework", "kubernetes", "--skip-download",
                             "--quiet", "--compact", "--output", "json"],
                            capture_output=True, text=True, timeout=600)
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert isinstance(report, dict) and report["check_type"] == "kubernetes", str(report)[:2000]
    summary, failed = report["summary"], report["results"]["failed_checks"]
    resources = sum(len([d for d in yaml.safe_load_all(p.read_text()) if d]) for p in scanned.glob("*.yaml"))
    # (checkov counts some containers apart from their pods, so at least one per document)
    assert summary["parsing_errors"] == 0 and summary["resource_count"] >= resources, summary
    assert summary["passed"] > 300, summary  # every resource was really checked

    in_canary = {c["check_id"] for c in failed if c["file_path"].endswith("canary.yaml")}
    # privileged, allowPrivilegeEscalation, root: checkov saw the canary and failed it
    assert {"CKV_K8S_16", "CKV_K8S_20", "CKV_K8S_23"} <= in_canary, in_canary

    ours = [c for c in failed if not c["file_path"].endswith("canary.yaml")]
    unexplained = [f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}" for c in ours
                   if c["check_id"] not in CHECKOV_ALLOWED
                   or not fnmatch.fnmatch(c["resource"], CHECKOV_ALLOWED[c["check_id"]][0])]
    assert not unexplained, "\n".join(unexplained)
    # An allowance nothing needs any more goes: every one is still used.
    unused = set(CHECKOV_ALLOWED) - {c["check_id"] for c in ours}
    assert not unused, f"allowed but no longer failing, remove from CHECKOV_ALLOWED: {sorted(unused)}"


# ---- cross-checks ----------------------------------------------------------------------------------

def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def pod_templates(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(workload, pod template) of every Deployment and Job."""
    return [(d, d["spec"]["template"]) for d in docs if d["kind"] in ("Deployment", "Job")]


def containers(pod: dict) -> list[dict]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def selects(selector: dict, labels: dict) -> bool:
    expressions_hold = all(
        (labels.get(e["key"]) in e["values"]) == (e["operator"] == "In") for e in selector.get("matchExpressions", []))
    return bool(selector) and expressions_hold and all(
        labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def probe_paths() -> set[str]:
    """The paths the probe port answers, read from its handler (no server needed)."""
    source = (REPO / "services/frontends/probes.py").read_text()
    return set(re.findall(r'"(/[a-z0-9/]+)"', source.split("def do_GET", 1)[1].split("def _answer", 1)[0]))


def test_the_probe_paths_are_read_from_the_probe_server():
    assert {"/livez", "/readyz", "/metrics"} <= probe_paths()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_hardened_and_bounded(documents, overlay):
    docs = documents[overlay]
    workloads = pod_templates(docs)
    assert workloads
    for workload, pod in workloads:
        name, spec = workload["metadata"]["name"], pod["spec"]
        security = spec["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] > 0 and security["runAsGroup"] > 0, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for container in containers(pod):
            where = f"{name}/{container['name']}"
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]} and not context.get("privileged"), where
            assert container["imagePullPolicy"] == "IfNotPresent" and "/" in container["image"], where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), (where, bound)
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"
            assert set(mounts.values()) <= volumes, where
            names = [e["name"] for e in container.get("env", [])]
            assert len(names) == len(set(names)), f"{where}: duplicate env {names}"
        for volume in spec.get("volumes", []):
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), f"{name}: emptyDir {volume['name']} without a sizeLimit"
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"model-suite"}


@pytest.mark.parametrize("overlay", SUITE_OVERLAYS)
def test_suite_manifests_agree_with_each_other_and_with_the_suite(documents, overlay):
    from bentoml._internal.container.generate import BENTO_UID_GID  # the uid BentoML's images run as

    docs = documents[overlay]
    [deployment] = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]
    labels, spec = pod["metadata"]["labels"], pod["spec"]
    assert selects(deployment["spec"]["selector"], labels)
    assert all(selects(c["labelSelector"], labels) for c in spec["topologySpreadConstraints"])
    [suite] = [c for c in spec["containers"] if c["name"] == "suite"]
    assert suite["image"].rsplit(":", 1)[0].endswith("/model-suite")
    ports = {p["name"]: p["containerPort"] for p in suite["ports"]}
    defaults = ServingConfig()
    assert ports == {"http": defaults.http_port, "grpc": defaults.grpc_port, "probes": defaults.probe_port}

    [service] = by_kind(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert selects({"matchLabels": service["spec"]["selector"]}, labels)
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]], port
    protocols = {p["name"]: p.get("appProtocol") for p in service["spec"]["ports"]}
    assert protocols == {"http": "http", "grpc": "kubernetes.io/h2c", "metrics": "http"}

    annotations = pod["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["probes"] and annotations["prometheus.io/path"] in probe_paths()
    for name, path in (("startupProbe", "/readyz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/livez")):
        if overlay.endswith("grpc-probes") and name != "livenessProbe":  # grpc.health.v1 on the gRPC port
            from services.frontends.oip_grpc import HEALTH_SERVICES

            probe = suite[name]["grpc"]
            assert probe["port"] == ports["grpc"] and probe.get("service", "") in HEALTH_SERVICES, (name, probe)
            continue
        probe = suite[name]["httpGet"]
        assert probe["port"] == "probes" and probe["path"] == path and path in probe_paths(), (name, probe)
    startup = suite["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "models need time to load and warm up"

    scaled, on_demand = by_kind(docs, "ScaledObject"), by_kind(docs, "HTTPScaledObject")
    if on_demand:  # scale to zero: the HTTP add-on's interceptor holds requests while a pod starts
        [on_demand] = on_demand
        assert not by_kind(docs, "HorizontalPodAutoscaler") and deployment["spec"]["replicas"] == 0
        target = on_demand["spec"]["scaleTargetRef"]
        assert target["name"] == deployment["metadata"]["name"] and target["service"] == service["metadata"]["name"]
        assert target["portName"] in {p["name"] for p in service["spec"]["ports"]}
        assert on_demand["spec"]["replicas"]["min"] == 0 < on_demand["spec"]["replicas"]["max"]
        wait_s = int(on_demand["spec"]["timeouts"]["conditionWait"].rstrip("s"))
        assert wait_s >= 60, "a held request must outlast a cold start (deploy/README.md)"
    elif scaled:  # KEDA owns the HPA: the base's is removed, the ScaledObject's triggers read suite metrics
        [scaled] = scaled
        assert not by_kind(docs, "HorizontalPodAutoscaler")
        scaling = scaled["spec"]
        assert scaling["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert 2 <= scaling["minReplicaCount"] < scaling["maxReplicaCount"]
        queries = " ".join(t["metadata"].get("query", "") for t in scaling["triggers"])
        names = set(re.findall(r"suite_\w+", queries))
        assert names and names <= exported_metric_names(), names
        assert any(t["type"] == "cpu" for t in scaling["triggers"])  # CPU stays a signal
    else:
        [hpa] = by_kind(docs, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                 "name": deployment["metadata"]["name"]}
        [metric] = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
        assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]  # with the PDB, a drain leaves one serving
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] > 0
    [pdb] = by_kind(docs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"], labels) and (pdb["spec"].get("maxUnavailable") == 1
                                                         or pdb["spec"].get("minAvailable") == 1)
    [policy] = by_kind(docs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"], labels)
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == set(ports.values())
    # Every port admits only named peers: no rule without a `from`, and the probe port only Prometheus.
    assert all(rule.get("from") for rule in policy["spec"]["ingress"])
    [probe_rule] = [r for r in policy["spec"]["ingress"] if {p["port"] for p in r["ports"]} == {ports["probes"]}]
    assert [peer["podSelector"] for peer in probe_rule["from"]] == [
        {"matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In", "values": ["prometheus"]}]}]
    [account] = by_kind(docs, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"] and account["automountServiceAccountToken"] is False

    security = spec["securityContext"]
    assert security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == BENTO_UID_GID
    writable = {m["mountPath"] for m in suite["volumeMounts"] if not m.get("readOnly")}
    assert writable == {"/tmp", "/var/lib/model-suite"}
    env = {e["name"]: e for e in suite["env"]}
    if overlay.endswith("own-models"):  # the users' models: a read-only claim the pods read beside their own
        [models] = [m for m in suite["volumeMounts"] if m.get("readOnly")]
        [volume] = [v for v in spec["volumes"] if v["name"] == models["name"]]
        [claim] = by_kind(docs, "PersistentVolumeClaim")
        assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
        assert env["SUITE_MODEL_DIR"]["value"].startswith(models["mountPath"] + "/")
    assert env["BENTOML_HOME"]["value"].startswith("/tmp/") and env["TMPDIR"]["value"] == "/tmp"
    assert env["SUITE_INTRA_OP_THREADS"]["value"] == "1" and env["OMP_NUM_THREADS"]["value"] == "1"
    key = env["SUITE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert key["optional"] is True and key["name"] and key["key"]
    fields = {f.name for f in dataclasses.fields(ServingConfig)}
    for name in env:
        if name.startswith("SUITE_"):
            assert name.removeprefix("SUITE_").lower() in fields, f"{name} is not a serving setting"

    # SIGTERM comes after the preStop pause; BentoML's arbiter then drains for up to 30 s.
    pause = suite["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep" and 0 < int(pause[1]) <= 10, pause
    assert spec["terminationGracePeriodSeconds"] > int(pause[1]) + 30

    limits, requests = suite["resources"]["limits"], suite["resources"]["requests"]
    if overlay.endswith("gpu"):
        assert limits["nvidia.com/gpu"] == "1" and env["SUITE_WORKERS"]["value"] == "1"
        assert env["SUITE_PROVIDERS"]["value"] == "CUDAExecutionProvider,CPUExecutionProvider"
        assert spec["runtimeClassName"] == "nvidia" and spec["nodeSelector"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert suite["image"].endswith("-gpu")
    else:
        workers = env["SUITE_WORKERS"]["valueFrom"]["resourceFieldRef"]
        assert workers == {"containerName": "suite", "resource": "limits.cpu", "divisor": "1"}
        assert env["SUITE_PROVIDERS"]["value"] == "CPUExecutionProvider"
        assert "nvidia.com/gpu" not in limits and requests["cpu"] == limits["cpu"]  # workers = the CPUs it gets


def test_load_test_targets_the_suite_and_is_bounded(documents):
    docs, suite_docs = documents["loadtest"], documents["overlays/cpu"]
    [suite_service] = by_kind(suite_docs, "Service")
    suite_labels = by_kind(suite_docs, "Deployment")[0]["spec"]["template"]["metadata"]["labels"]
    [master_service] = by_kind(docs, "Service")
    jobs = {j["metadata"]["name"]: j for j in by_kind(docs, "Job")}
    master, workers = jobs["locust-master"], jobs["locust-workers"]
    master_pod, worker_pod = master["spec"]["template"], workers["spec"]["template"]
    assert selects({"matchLabels": master_service["spec"]["selector"]}, master_pod["metadata"]["labels"])
    assert not selects({"matchLabels": master_service["spec"]["selector"]}, worker_pod["metadata"]["labels"])
    [master_container], [worker_container] = master_pod["spec"]["containers"], worker_pod["spec"]["containers"]
    master_ports = {p["name"]: p["containerPort"] for p in master_container["ports"]}
    assert {p["targetPort"] for p in master_service["spec"]["ports"]} == set(master_ports)
    assert master_ports == {"workers": 5557, "web": 8089}

    master_args, worker_args = master_container["args"], worker_container["args"]
    assert "--master" in master_args and "--worker" in worker_args
    host = master_args[master_args.index("--host") + 1]
    http = next(p["port"] for p in suite_service["spec"]["ports"] if p["name"] == "http")
    assert host == f"http://{suite_service['metadata']['name']}:{http}"
    assert worker_args[worker_args.index("--master-host") + 1] == master_service["metadata"]["name"]
    expected = int(master_args[master_args.index("--expect-workers") + 1])
    assert workers["spec"]["parallelism"] == expected == workers["spec"]["completions"]

    # Bounded: the profile runs headless for a fixed time, and the Jobs have deadlines.
    for args in (master_args, worker_args):
        assert args[args.index("--config") + 1] == "loadtest/profile.toml"
    profile = tomllib.loads((REPO / "loadtest/profile.toml").read_text())["tool"]["locust"]
    assert profile["headless"] is True and profile["run-time"] and profile["users"] > 0
    assert (REPO / profile["locustfile"]).exists()
    assert all(0 < j["spec"]["activeDeadlineSeconds"] <= 3600 for j in jobs.values())
    # Reports on the volume mounted there.
    mounts = {m["mountPath"]: m["name"] for m in master_container["volumeMounts"]}
    for flag in ("--csv", "--html"):
        target = master_args[master_args.index(flag) + 1]
        assert any(target.startswith(path + "/") for path in mounts if path != "/tmp"), (flag, target)
    volumes = {v["name"]: v for v in master_pod["spec"]["volumes"]}
    claim = volumes[mounts["/reports"]]["persistentVolumeClaim"]["claimName"]
    assert [c["metadata"]["name"] for c in by_kind(docs, "PersistentVolumeClaim")] == [claim]

    [policy] = by_kind(docs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"], master_pod["metadata"]["labels"])
    assert selects(policy["spec"]["podSelector"], worker_pod["metadata"]["labels"])
    egress_to_suite = [rule for rule in policy["spec"]["egress"]
                       if any(selects(t.get("podSelector", {}), suite_labels) for t in rule.get("to", []))]
    assert [p["port"] for rule in egress_to_suite for p in rule["ports"]] == [3000]


def exported_metric_names() -> set[str]:
    """The metric names the suite's /metrics page can carry (services/metrics.py)."""
    from prometheus_client import CollectorRegistry

    from services.metrics import ServingMetrics

    registry = CollectorRegistry()
    ServingMetrics(("m",), registry)
    return {metric.name for metric in registry.collect()}


def test_batch_job_shards_agree(documents):
    """The Indexed Job: as many shards in --shard as completions, one output file per index, the
    suite's image and its models, and a retry per index (a resumed shard)."""
    (job,) = [d for d in documents["batch"] if d["kind"] == "Job"]
    spec = job["spec"]
    (container,) = spec["template"]["spec"]["containers"]
    args = container["args"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert args[args.index("--shard") + 1] == f"$(SHARD)/{spec['completions']}"
    assert any("$(SHARD)" in a and a.endswith(".jsonl") for a in args[:3])
    assert container["command"][-2:] == ["-m", "services.batch"] and container["image"].endswith("model-suite:latest")
    env = {e["name"]: e for e in container["env"]}
    assert "job-completion-index" in env["SHARD"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert spec["backoffLimitPerIndex"] >= 1 and spec["template"]["spec"]["restartPolicy"] == "Never"
