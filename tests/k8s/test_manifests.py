"""The Kubernetes manifests (k8s/) and images (docker/), checked offline.

Every kustomization renders with `kubectl kustomize`; every rendered object
validates strictly against the Kubernetes JSON schemas of a pinned version
(kubernetes-validate, no cluster). Then the wiring is read off the rendered
objects: Services select pods that exist and target ports they declare, probes
name declared ports and the health service names the code serves, the endpoints
the services read (router -> workers and Redis, gateway -> router, everyone ->
collector -> Jaeger) point at Services that exist with the right port,
NetworkPolicies allow exactly the graph below, pods are locked down, GPU workers
ask for GPUs (and CPU ones do not), and every GLIMPROUTER_* variable is a field of
that service's settings dataclass (services.common.settings.env_name), or a
variable the code reads by that literal name.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# The oldest Kubernetes the manifests support: native gRPC probes (GA 1.27), the
# preStop `sleep` action (on by default from 1.30), nodeTaintsPolicy (1.26).
KUBE_VERSION = "1.30.0"

KUSTOMIZATIONS = {
    "base": K8S / "base",
    "gpu": K8S / "overlays" / "gpu",
    "cpu": K8S / "overlays" / "cpu",
    "managed-redis": K8S / "overlays" / "managed-redis",
}
GPU_KINDS = {"base", "gpu", "managed-redis"}

NAME = "app.kubernetes.io/name"
COMPONENT = "app.kubernetes.io/component"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
GPU = "nvidia.com/gpu"


# ---- rendering -----------------------------------------------------------------------------
def _kustomize_cmd(path: Path) -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(path)]
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(path)]
    return None


@functools.lru_cache(maxsize=None)
def render(name: str) -> tuple[dict, ...]:
    cmd = _kustomize_cmd(KUSTOMIZATIONS[name])
    if cmd is None:
        pytest.skip("kubectl (or kustomize) is not installed: the manifests cannot be rendered here")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr}"
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


@pytest.fixture(params=sorted(KUSTOMIZATIONS))
def overlay(request) -> str:
    return request.param


@pytest.fixture
def docs(overlay) -> tuple[dict, ...]:
    return render(overlay)


def objs(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def get(docs, kind: str, name: str) -> dict | None:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    return None


@dataclasses.dataclass
class Workload:
    obj: dict

    @property
    def kind(self) -> str:
        return self.obj["kind"]

    @property
    def name(self) -> str:
        return self.obj["metadata"]["name"]

    @property
    def pod(self) -> dict:
        return self.obj["spec"]["template"]

    @property
    def spec(self) -> dict:
        return self.pod["spec"]

    @property
    def labels(self) -> dict:
        return self.pod["metadata"].get("labels", {})

    @property
    def containers(self) -> list[dict]:
        return self.spec["containers"]

    @property
    def all_containers(self) -> list[dict]:
        return self.spec.get("initContainers", []) + self.spec["containers"]

    def ports(self) -> dict[str, tuple[int, str]]:
        """Declared container ports by name (and by number as a string)."""
        out = {}
        for c in self.containers:
            for p in c.get("ports", []):
                val = (p["containerPort"], p.get("protocol", "TCP"))
                out[str(p["containerPort"])] = val
                if "name" in p:
                    out[p["name"]] = val
        return out

    def resolve_port(self, port: int | str) -> tuple[int, str] | None:
        return self.ports().get(str(port))


def workloads(docs) -> list[Workload]:
    return [Workload(d) for d in docs if d["kind"] in WORKLOAD_KINDS]


def workload(docs, name: str) -> Workload:
    for w in workloads(docs):
        if w.name == name:
            return w
    raise AssertionError(f"no workload named {name}")


def matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions) against a label set."""
    if selector is None:
        return False
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        key, op, vals = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def selected(docs, selector: dict) -> list[Workload]:
    """Workloads whose pods a selector picks: a LabelSelector, or a Service's plain label map."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    return [w for w in workloads(docs) if matches(selector, w.labels)]


# ---- environment ---------------------------------------------------------------------------
FROM_REF = "<valueFrom>"


def effective_env(docs, container: dict) -> dict[str, str]:
    """What the process sees: envFrom ConfigMaps/Secrets, then env (env wins)."""
    env: dict[str, str] = {}
    for ef in container.get("envFrom", []):
        prefix = ef.get("prefix", "")
        if "configMapRef" in ef:
            cm = get(docs, "ConfigMap", ef["configMapRef"]["name"])
            assert cm is not None, f"envFrom names a missing ConfigMap {ef['configMapRef']['name']}"
            env.update({prefix + k: v for k, v in (cm.get("data") or {}).items()})
        if "secretRef" in ef:
            s = get(docs, "Secret", ef["secretRef"]["name"])
            assert s is not None, f"envFrom names a missing Secret {ef['secretRef']['name']}"
            keys = list((s.get("stringData") or {})) + list((s.get("data") or {}))
            env.update({prefix + k: FROM_REF for k in keys})
    for e in container.get("env", []):
        env[e["name"]] = FROM_REF if "valueFrom" in e else str(e.get("value", ""))
    return env


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion; variables from a Secret become "secret"."""
    def sub(m):
        v = env.get(m.group(1))
        if v is None:
            return m.group(0)
        return "secret" if v == FROM_REF else expand(v, env)

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def setting_value(env: dict[str, str], cls: type, field: str):
    """The value a settings field takes in this container: its env var or the default."""
    from services.common.settings import env_name

    f = {f.name: f for f in dataclasses.fields(cls)}[field]
    raw = env.get(env_name(field))
    if raw is None:
        return f.default
    return type(f.default)(raw) if not isinstance(f.default, tuple) else tuple(x.strip() for x in raw.split(","))


def settings_classes() -> dict[str, type]:
    from gateway.config import GatewaySettings
    from services.router.config import RouterSettings
    from services.worker.config import WorkerSettings

    return {"worker": WorkerSettings, "router": RouterSettings, "gateway": GatewaySettings}


def main_container(w: Workload) -> dict:
    assert len(w.containers) == 1, f"{w.name}: one container expected"
    return w.containers[0]


def service_for(docs, host: str) -> dict | None:
    """The Service a short or namespace-qualified DNS name points at."""
    ns = {d["metadata"].get("namespace") for d in docs if d["kind"] == "Service"}
    parts = host.split(".")
    name = parts[0]
    if len(parts) > 1 and not (parts[1] in ns and all(p in ("svc", "cluster", "local") for p in parts[2:])):
        return None
    return get(docs, "Service", name)


def service_target(docs, svc: dict, port: int) -> tuple[list[Workload], tuple[int, str]]:
    """The pods a Service port sends to, and the container port it lands on."""
    sp = [p for p in svc["spec"]["ports"] if p["port"] == port]
    assert sp, f"Service {svc['metadata']['name']} has no port {port}"
    pods = selected(docs, svc["spec"]["selector"])
    assert pods, f"Service {svc['metadata']['name']} selects no pods"
    target = sp[0].get("targetPort", port)
    landed = {w.resolve_port(target) for w in pods}
    assert None not in landed and len(landed) == 1, f"Service {svc['metadata']['name']}:{port} -> {target}: {landed}"
    return pods, landed.pop()


# ---- 1. render and validate ----------------------------------------------------------------
def test_renders_and_validates_strictly(docs, overlay):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    assert docs, f"{overlay} rendered nothing"
    errors = []
    for d in docs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        try:
            kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
        except SchemaNotFoundError as exc:
            errors.append(f"{where}: {exc.message}")
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{where}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert not errors, "\n".join(errors)


def test_everything_in_one_namespace(docs):
    names = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert names == {"glimprouter"}
    ns = get(docs, "Namespace", "glimprouter")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# ---- 2. Services, probes, references ---------------------------------------------------------
def test_services_select_pods_and_target_declared_ports(docs):
    for svc in objs(docs, "Service"):
        sel = svc["spec"].get("selector")
        assert sel, f"Service {svc['metadata']['name']} has no selector"
        for p in svc["spec"]["ports"]:
            service_target(docs, svc, p["port"])


def test_statefulsets_have_their_governing_headless_service(docs):
    for w in workloads(docs):
        if w.kind != "StatefulSet":
            continue
        svc = get(docs, "Service", w.obj["spec"]["serviceName"])
        assert svc is not None, f"{w.name}: governing Service missing"
        assert svc["spec"].get("clusterIP") == "None", f"{w.name}: governing Service must be headless"
        assert w in selected(docs, svc["spec"]["selector"])


def _probe_port(probe: dict):
    for kind in ("httpGet", "tcpSocket", "grpc"):
        if kind in probe:
            return kind, probe[kind]["port"]
    return "exec", None


def test_probes_name_declared_ports(docs):
    for w in workloads(docs):
        for c in w.containers:
            assert "readinessProbe" in c and "livenessProbe" in c, f"{w.name}/{c['name']}: probes missing"
            for which in ("startupProbe", "livenessProbe", "readinessProbe"):
                if which not in c:
                    continue
                kind, port = _probe_port(c[which])
                if kind == "exec":
                    continue
                if kind == "grpc":
                    assert isinstance(port, int), "gRPC probes take a port number"
                declared = {str(p["containerPort"]) for p in c.get("ports", [])} | {p.get("name") for p in c.get("ports", [])}
                assert str(port) in declared, f"{w.name}/{c['name']} {which}: port {port} is not declared"


def test_grpc_probes_ask_for_the_health_names_the_code_serves(docs):
    from services.router import server as router_server
    from services.worker import server as worker_server

    served = {"worker": worker_server, "router": router_server}
    for w in workloads(docs):
        comp = w.labels.get(COMPONENT)
        if comp not in served:
            continue
        mod = served[comp]
        c = main_container(w)
        readiness = {"", mod.SERVICE_NAME}
        assert c["livenessProbe"]["grpc"].get("service") == mod.LIVENESS, f"{w.name}: liveness must ask for {mod.LIVENESS!r}"
        assert c["readinessProbe"]["grpc"].get("service", "") in readiness, f"{w.name}: readiness must ask for {readiness}"
        assert "startupProbe" in c, f"{w.name}: a startupProbe is needed"
        assert c["startupProbe"]["grpc"].get("service", "") in readiness | {mod.LIVENESS}


def test_gateway_http_probes_are_routes_of_the_gateway(docs):
    source = (ROOT / "gateway" / "app.py").read_text()
    c = main_container(workload(docs, "gateway"))
    for which in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = c[which]["httpGet"]["path"]
        assert f'Route("{path}"' in source, f"gateway {which}: {path} is not a route in gateway/app.py"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_volumes_and_references_exist(docs):
    for w in workloads(docs):
        vols = {v["name"]: v for v in w.spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in w.obj["spec"].get("volumeClaimTemplates", [])}
        for c in w.all_containers:
            for m in c.get("volumeMounts", []):
                assert m["name"] in vols or m["name"] in claims, f"{w.name}/{c['name']}: volume {m['name']} undeclared"
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    s = get(docs, "Secret", ref["name"])
                    assert s and ref["key"] in (s.get("stringData") or {}) | (s.get("data") or {}), f"{w.name}: {ref}"
        for v in vols.values():
            if "persistentVolumeClaim" in v:
                assert get(docs, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]), v
            if "configMap" in v:
                assert get(docs, "ConfigMap", v["configMap"]["name"]), v
            if "secret" in v and not v["secret"].get("optional"):
                assert get(docs, "Secret", v["secret"]["secretName"]), v
    for ing in objs(docs, "Ingress"):
        for tls in ing["spec"].get("tls", []):
            assert get(docs, "Secret", tls["secretName"]), tls
        for rule in ing["spec"]["rules"]:
            for p in rule["http"]["paths"]:
                b = p["backend"]["service"]
                svc = get(docs, "Service", b["name"])
                assert svc, b
                assert any(sp.get("name") == b["port"].get("name") or sp["port"] == b["port"].get("number")
                           for sp in svc["spec"]["ports"]), b


def test_autoscaler_and_disruption_budgets_point_at_workloads(docs, overlay):
    for hpa in objs(docs, "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = get(docs, ref["kind"], ref["name"])
        assert target is not None, ref
        assert "replicas" not in target["spec"], f"{ref['name']}: the HPA owns replicas; leave them out"
    router_hpa = get(docs, "HorizontalPodAutoscaler", "router")
    assert router_hpa is not None
    if overlay in GPU_KINDS:
        assert router_hpa["spec"]["minReplicas"] >= 2, "production runs several routers"
    for pdb in objs(docs, "PodDisruptionBudget"):
        assert selected(docs, pdb["spec"]["selector"]), f"PDB {pdb['metadata']['name']} selects nothing"
    assert get(docs, "PodDisruptionBudget", "router")
    spread = workload(docs, "router").spec.get("topologySpreadConstraints", [])
    assert any(t["topologyKey"] == "kubernetes.io/hostname" for t in spread), "routers spread across nodes"


# ---- 3. what the services read points at what exists ----------------------------------------
def _endpoint(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def _check_worker_pool(docs, value: str, role: str) -> None:
    from services.worker.config import WorkerSettings

    entries = [_endpoint(v.strip()) for v in value.split(",") if v.strip()]
    assert entries, f"no {role} endpoints"
    stateful = {}
    for host, port in entries:
        pod, _, svc_name = host.partition(".")
        svc = get(docs, "Service", svc_name)
        assert svc is not None, f"{host}: no Service {svc_name}"
        assert svc["spec"].get("clusterIP") == "None", f"{host}: per-pod DNS needs a headless Service"
        sts = [w for w in workloads(docs) if w.kind == "StatefulSet" and w.obj["spec"]["serviceName"] == svc_name]
        assert len(sts) == 1, f"{host}: no StatefulSet governed by {svc_name}"
        w = sts[0]
        m = re.fullmatch(re.escape(w.name) + r"-(\d+)", pod)
        assert m, f"{host}: {pod} is not a pod of {w.name}"
        assert w.labels.get("glimprouter.dev/role") == role, f"{host} is not a {role} worker"
        stateful.setdefault(w.name, set()).add(int(m.group(1)))
        _, (cport, _) = service_target(docs, svc, port)
        listen = setting_value(effective_env(docs, main_container(w)), WorkerSettings, "port")
        assert cport == listen, f"{host}:{port} lands on {cport}, the worker listens on {listen}"
    for name, ordinals in stateful.items():
        replicas = workload(docs, name).obj["spec"].get("replicas", 1)
        assert ordinals == set(range(replicas)), (
            f"the router's {role} list names replicas {sorted(ordinals)} of {name}, which has {replicas}")


def test_router_points_at_every_worker_replica_and_redis(docs, overlay):
    from services.router.config import RouterSettings

    env = effective_env(docs, main_container(workload(docs, "router")))
    _check_worker_pool(docs, env["GLIMPROUTER_SMALL"], "small")
    _check_worker_pool(docs, env["GLIMPROUTER_LARGE"], "large")
    for w in workloads(docs):
        if w.labels.get(COMPONENT) == "worker":
            assert w.name in env["GLIMPROUTER_SMALL"] + env["GLIMPROUTER_LARGE"], f"no router uses {w.name}"

    url = urlsplit(expand(env["GLIMPROUTER_REDIS_URL"], env))
    assert url.scheme in ("redis", "rediss") and url.password == "secret", "AUTH comes from the redis-auth Secret"
    svc = service_for(docs, url.hostname)
    if overlay == "managed-redis":
        assert svc is None and url.scheme == "rediss", "a managed Redis is reached over TLS"
        assert get(docs, "StatefulSet", "redis") is None
    else:
        assert svc is not None, f"Redis URL host {url.hostname} is not a Service"
        pods, (cport, _) = service_target(docs, svc, url.port)
        assert [p.name for p in pods] == ["redis"] and cport == 6379
    listen = setting_value(env, RouterSettings, "port")
    assert workload(docs, "router").resolve_port(listen), "the router listens on a declared port"


def test_gateway_points_at_the_router_service(docs):
    from gateway.config import GatewaySettings
    from services.router.config import RouterSettings

    env = effective_env(docs, main_container(workload(docs, "gateway")))
    host, port = _endpoint(setting_value(env, GatewaySettings, "router"))
    svc = service_for(docs, host)
    assert svc is not None, f"gateway's router endpoint {host} is not a Service"
    pods, (cport, _) = service_target(docs, svc, port)
    assert [p.name for p in pods] == ["router"]
    router_env = effective_env(docs, main_container(pods[0]))
    assert cport == setting_value(router_env, RouterSettings, "port")
    keys = setting_value(env, GatewaySettings, "api_keys_file")
    mounts = main_container(workload(docs, "gateway"))["volumeMounts"]
    assert any(keys.startswith(m["mountPath"] + "/") for m in mounts), "the API keys file is on a mounted Secret"


def test_services_listen_on_all_interfaces_and_declared_ports(docs):
    classes = settings_classes()
    for w in workloads(docs):
        comp = w.labels.get(COMPONENT)
        if comp not in classes:
            continue
        env = effective_env(docs, main_container(w))
        host = setting_value(env, classes[comp], "host")
        assert host in ("0.0.0.0", "::", "[::]"), f"{w.name} listens on {host}: unreachable from other pods"
        assert w.resolve_port(setting_value(env, classes[comp], "port")), f"{w.name}: its port is not declared"
        fields = {f.name for f in dataclasses.fields(classes[comp])}
        if "metrics_port" in fields:
            mport = setting_value(env, classes[comp], "metrics_port")
            assert w.resolve_port("metrics") == (mport, "TCP"), f"{w.name}: metrics port {mport} must be the declared 'metrics' port"


def test_every_service_exports_traces_to_the_collector(docs):
    classes = settings_classes()
    for w in workloads(docs):
        if w.labels.get(COMPONENT) not in classes:
            continue
        env = effective_env(docs, main_container(w))
        for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
            assert env.get(var), f"{w.name}: {var} is not set"
        url = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        svc = service_for(docs, url.hostname)
        assert svc is not None, f"{w.name}: OTLP endpoint {url.hostname} is not a Service"
        pods, (cport, _) = service_target(docs, svc, url.port)
        assert [p.name for p in pods] == ["otel-collector"] and cport == url.port
        assert "$(" not in expand(env["OTEL_RESOURCE_ATTRIBUTES"], env), "every $(VAR) in the resource attributes is defined"
    # The collector receives on the port its Service targets and exports to Jaeger's Service.
    collector = workload(docs, "otel-collector")
    cm_name = next(v["configMap"]["name"] for v in collector.spec["volumes"] if "configMap" in v)
    config = yaml.safe_load(next(iter(get(docs, "ConfigMap", cm_name)["data"].values())))
    recv = _endpoint(config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"])
    assert collector.resolve_port(recv[1]) == (4317, "TCP")
    for name in config["service"]["pipelines"]["traces"]["exporters"]:
        host, port = _endpoint(config["exporters"][name]["endpoint"])
        svc = service_for(docs, host)
        assert svc is not None, f"collector exporter {name} -> {host} is not a Service"
        pods, (cport, _) = service_target(docs, svc, port)
        assert [p.name for p in pods] == ["jaeger"]


# ---- 4. one source of truth for configuration names ----------------------------------------
def _names_read_by_code() -> set[str]:
    found = set()
    for pkg in ("services", "gateway", "cli"):
        for f in (ROOT / pkg).rglob("*.py"):
            found |= set(re.findall(r"\bGLIMPROUTER_[A-Z0-9_]+\b", f.read_text()))
    return found


def test_glimprouter_env_vars_are_settings_fields(docs):
    from services.common.settings import env_name

    classes = settings_classes()
    read_by_code = _names_read_by_code()
    bad = []
    for w in workloads(docs):
        comp = w.labels.get(COMPONENT)
        for c in w.all_containers:
            names = {n for n in effective_env(docs, c) if n.startswith("GLIMPROUTER_")}
            if comp not in classes:
                bad += [f"{w.name}/{c['name']}: {n} set on a non-GlimpRouter container" for n in names]
                continue
            fields = {env_name(f.name) for f in dataclasses.fields(classes[comp])}
            for n in sorted(names - fields):
                if n not in read_by_code:
                    bad.append(f"{w.name}/{c['name']}: {n} is neither a {classes[comp].__name__} field nor read by the code")
    assert not bad, "\n".join(bad)


def test_settings_values_parse(docs):
    """Each GLIMPROUTER_* value set in the manifests is accepted by the settings loader."""
    from services.common.settings import from_namespace

    classes = settings_classes()
    for w in workloads(docs):
        comp = w.labels.get(COMPONENT)
        if comp not in classes:
            continue
        env = effective_env(docs, main_container(w))
        environ = {k: expand(v, env) for k, v in env.items() if k.startswith("GLIMPROUTER_")}
        from_namespace(classes[comp], None, environ)  # raises SystemExit on a bad value


# ---- 5. GPUs --------------------------------------------------------------------------------
def test_gpu_workers_request_gpus_and_cpu_workers_do_not(docs, overlay):
    workers = [w for w in workloads(docs) if w.labels.get(COMPONENT) == "worker"]
    assert {w.labels.get("glimprouter.dev/role") for w in workers} == {"small", "large"}
    for w in workers:
        c = main_container(w)
        env = effective_env(docs, c)
        res = c["resources"]
        if overlay in GPU_KINDS:
            assert env["GLIMPROUTER_BACKEND"] == "trtllm"
            assert int(res["requests"][GPU]) >= 1 and res["requests"][GPU] == res["limits"][GPU], f"{w.name}: GPU"
            assert w.spec.get("nodeSelector", {}).get("nvidia.com/gpu.present") == "true", f"{w.name}: GPU nodes"
            assert any(t.get("key") == GPU for t in w.spec.get("tolerations", [])), f"{w.name}: GPU taint"
            shm = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert shm, f"{w.name}: /dev/shm"
            vol = next(v for v in w.spec["volumes"] if v["name"] == shm[0]["name"])
            assert vol["emptyDir"]["medium"] == "Memory"
        else:
            assert env["GLIMPROUTER_BACKEND"] == "llamacpp"
            text = json.dumps(w.obj)
            assert GPU not in text and "nvidia" not in text, f"{w.name}: a CPU worker mentions GPUs"
    for w in workloads(docs):
        if w.labels.get(COMPONENT) != "worker":
            assert GPU not in json.dumps(w.obj["spec"]["template"]["spec"]), f"{w.name} asks for a GPU"


def test_models_are_where_the_workers_look(docs, overlay):
    from services.worker.models import load_manifest

    manifest = load_manifest()
    for w in workloads(docs):
        if w.labels.get(COMPONENT) != "worker":
            continue
        c = main_container(w)
        env = effective_env(docs, c)
        model = env["GLIMPROUTER_MODEL"]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        if overlay in GPU_KINDS:
            mount = next((p for p in mounts if model.startswith(p + "/")), None)
            assert mount and mounts[mount].get("readOnly"), f"{w.name}: {model} is not on a read-only mount"
            vol = next(v for v in w.spec["volumes"] if v["name"] == mounts[mount]["name"])
            pvc = get(docs, "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"])
            assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
            assert vol["persistentVolumeClaim"].get("readOnly") is True
        else:
            assert model in manifest, f"{w.name}: {model} is not in services/worker/models.json"
            models_dir = env["GLIMPROUTER_MODELS_DIR"]
            assert models_dir in mounts
            claims = {t["metadata"]["name"] for t in w.obj["spec"].get("volumeClaimTemplates", [])}
            assert mounts[models_dir]["name"] in claims, f"{w.name}: models on a per-replica volume"
            init = {i["name"]: i for i in w.spec.get("initContainers", [])}["fetch-model"]
            ienv = effective_env(docs, init)
            cmd = [expand(x, ienv) for x in init["command"]]
            assert cmd[:4] == ["python", "-m", "services.worker.models", "fetch"] and cmd[4:] == [model]
            assert ienv["GLIMPROUTER_MODELS_DIR"] == models_dir
            assert any(m["mountPath"] == models_dir and not m.get("readOnly") for m in init["volumeMounts"])
    if overlay in GPU_KINDS:
        small = effective_env(docs, main_container(workload(docs, "worker-small")))["GLIMPROUTER_MODEL"]
        large = effective_env(docs, main_container(workload(docs, "worker-large")))["GLIMPROUTER_MODEL"]
        assert small != large
        if overlay != "base":
            assert (small, large) == ("/models/Qwen3-4B", "/models/Qwen3-32B"), "the paper's pair"


# ---- 6. shutdown and startup budgets ---------------------------------------------------------
def _window(probe: dict) -> int:
    return probe.get("initialDelaySeconds", 0) + probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


def test_grace_periods_cover_draining(docs):
    classes = settings_classes()
    for w in workloads(docs):
        comp = w.labels.get(COMPONENT)
        if comp not in classes:
            continue
        c = main_container(w)
        pre = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        grace = setting_value(effective_env(docs, c), classes[comp], "shutdown_grace_s")
        assert w.spec["terminationGracePeriodSeconds"] >= pre + grace + 5, (
            f"{w.name}: terminationGracePeriodSeconds must cover preStop {pre}s + shutdown grace {grace}s")


def test_startup_probes_cover_loading(docs):
    from services.router.config import RouterSettings

    router = main_container(workload(docs, "router"))
    timeout = setting_value(effective_env(docs, router), RouterSettings, "connect_timeout_s")
    assert _window(router["startupProbe"]) > timeout, "the router's startup window must cover its wait for workers"
    for w in workloads(docs):
        if w.labels.get(COMPONENT) == "worker":
            assert _window(main_container(w)["startupProbe"]) >= 600, f"{w.name}: model loading takes minutes"


# ---- 7. NetworkPolicies: exactly the paths the system uses -----------------------------------
DNS = "ns:kube-system{k8s-app=kube-dns}"
# The model download may reach public addresses only, not the cluster's networks.
PRIVATE = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,169.254.0.0/16"
GLIMPROUTER_PODS = ("gateway", "router", "worker-small", "worker-large", "redis", "otel-collector", "jaeger")


def expected_graph(overlay: str) -> set[tuple[str, str, int, str]]:
    g = {
        ("ns:ingress-nginx", "gateway", 8080, "TCP"),
        ("ns:monitoring", "gateway", 8080, "TCP"),
        ("gateway", "router", 50051, "TCP"),
        ("ns:monitoring", "router", 9464, "TCP"),
        ("router", "worker-small", 50061, "TCP"),
        ("router", "worker-large", 50061, "TCP"),
        ("ns:monitoring", "worker-small", 9464, "TCP"),
        ("ns:monitoring", "worker-large", 9464, "TCP"),
        ("router", "redis", 6379, "TCP"),
        ("gateway", "otel-collector", 4317, "TCP"),
        ("router", "otel-collector", 4317, "TCP"),
        ("worker-small", "otel-collector", 4317, "TCP"),
        ("worker-large", "otel-collector", 4317, "TCP"),
        ("otel-collector", "jaeger", 4317, "TCP"),
    }
    pods = list(GLIMPROUTER_PODS)
    if overlay == "managed-redis":
        g.discard(("router", "redis", 6379, "TCP"))
        g.add(("router", "cidr:192.0.2.0/24", 6380, "TCP"))
        pods.remove("redis")
    if overlay == "cpu":
        for w in ("worker-small", "worker-large"):
            g.add((w, f"cidr:0.0.0.0/0 except {PRIVATE}", 443, "TCP"))
    for p in pods:
        g |= {(p, DNS, 53, "UDP"), (p, DNS, 53, "TCP")}
    return g


def _peer(docs, peer: dict, own_ns_labels: dict) -> list[str]:
    """In-namespace workload names a peer stands for, or an external label."""
    if "ipBlock" in peer:
        block = peer["ipBlock"]
        return [f"cidr:{block['cidr']}" + (f" except {','.join(block['except'])}" if block.get("except") else "")]
    pod_sel = peer.get("podSelector", {})
    if "namespaceSelector" in peer and not matches(peer["namespaceSelector"], own_ns_labels):
        ns = (peer["namespaceSelector"].get("matchLabels") or {}).get("kubernetes.io/metadata.name")
        assert ns, f"name other namespaces by kubernetes.io/metadata.name: {peer}"
        extra = ",".join(f"{k}={v}" for k, v in sorted((pod_sel.get("matchLabels") or {}).items()))
        return [f"ns:{ns}" + (f"{{{extra}}}" if extra else "")]
    return [w.name for w in workloads(docs) if matches(pod_sel, w.labels)]


def _rule_ports(rule: dict, dst: Workload | None) -> list[tuple[int, str]] | None:
    """Ports a rule opens (named ports resolved on the destination); None = all."""
    if not rule.get("ports"):
        return None
    out = []
    for p in rule["ports"]:
        proto = p.get("protocol", "TCP")
        if isinstance(p["port"], int):
            out.append((p["port"], proto))
        elif dst is not None and dst.resolve_port(p["port"]):
            out.append((dst.resolve_port(p["port"])[0], proto))
    return out


def allowed_graph(docs) -> set[tuple[str, str, int, str]]:
    ns = get(docs, "Namespace", "glimprouter")
    ns_labels = {"kubernetes.io/metadata.name": "glimprouter", **ns["metadata"].get("labels", {})}
    pols = objs(docs, "NetworkPolicy")
    by_name = {w.name: w for w in workloads(docs)}

    def applying(w: Workload, direction: str) -> list[dict]:
        out = []
        for p in pols:
            types = p["spec"].get("policyTypes") or ["Ingress"] + (["Egress"] if "egress" in p["spec"] else [])
            if direction in types and matches(p["spec"]["podSelector"], w.labels):
                out.append(p)
        return out

    def opens(rules_key: str, peer_key: str, w: Workload, other: str, port: tuple[int, str], dst: Workload):
        for p in applying(w, "Ingress" if rules_key == "ingress" else "Egress"):
            for rule in p["spec"].get(rules_key, []):
                peers = rule.get(peer_key)
                assert peers, f"NetworkPolicy {p['metadata']['name']}: a rule open to everyone"
                if other not in [x for peer in peers for x in _peer(docs, peer, ns_labels)]:
                    continue
                ports = _rule_ports(rule, dst)
                assert ports is not None, f"NetworkPolicy {p['metadata']['name']}: a rule open on every port"
                if port in ports:
                    return True
        return False

    graph = set()
    for src in by_name.values():
        for dst in by_name.values():
            for port in set(dst.ports().values()):
                if opens("egress", "to", src, dst.name, port, dst) and opens("ingress", "from", dst, src.name, port, dst):
                    graph.add((src.name, dst.name, *port))
    for w in by_name.values():
        for p in applying(w, "Ingress"):
            for rule in p["spec"].get("ingress", []):
                for peer in rule["from"]:
                    for ext in _peer(docs, peer, ns_labels):
                        if ext not in by_name:
                            graph |= {(ext, w.name, *port) for port in _rule_ports(rule, w)}
        for p in applying(w, "Egress"):
            for rule in p["spec"].get("egress", []):
                for peer in rule["to"]:
                    for ext in _peer(docs, peer, ns_labels):
                        if ext not in by_name:
                            graph |= {(w.name, ext, *port) for port in _rule_ports(rule, None)}
    return graph


def test_default_deny_covers_every_pod(docs):
    deny = [p for p in objs(docs, "NetworkPolicy") if p["spec"]["podSelector"] == {}
            and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny, "a default-deny NetworkPolicy for both directions"


def test_network_policy_ports_exist_on_their_pods(docs):
    """A rule's ports are ports its destination pods declare (no dead openings)."""
    ns_labels = {"kubernetes.io/metadata.name": "glimprouter"}
    by_name = {w.name: w for w in workloads(docs)}
    bad = []
    for p in objs(docs, "NetworkPolicy"):
        where = p["metadata"]["name"]
        for rule in p["spec"].get("ingress", []):
            for w in workloads(docs):
                if matches(p["spec"]["podSelector"], w.labels):
                    bad += [f"{where}: {w.name} declares no port {q['port']}" for q in rule.get("ports", [])
                            if not w.resolve_port(q["port"])]
        for rule in p["spec"].get("egress", []):
            dsts = {x for peer in rule["to"] for x in _peer(docs, peer, ns_labels) if x in by_name}
            for d in dsts:
                bad += [f"{where}: {d} declares no port {q['port']}" for q in rule.get("ports", [])
                        if not by_name[d].resolve_port(q["port"])]
    assert not bad, "\n".join(bad)


def test_network_policies_allow_exactly_the_system_graph(docs, overlay):
    got, want = allowed_graph(docs), expected_graph(overlay)
    assert got == want, f"allowed but not used: {sorted(got - want)}\nused but not allowed: {sorted(want - got)}"


# ---- 8. locked-down pods ---------------------------------------------------------------------
def test_pods_are_locked_down(docs):
    bad = []
    for w in workloads(docs):
        spec = w.spec
        psc = spec.get("securityContext", {})
        if spec.get("automountServiceAccountToken") is not False:
            bad.append(f"{w.name}: automountServiceAccountToken must be false")
        if psc.get("runAsNonRoot") is not True or psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            bad.append(f"{w.name}: pod securityContext needs runAsNonRoot and seccompProfile RuntimeDefault")
        if psc.get("runAsUser") == 0:
            bad.append(f"{w.name}: runs as root")
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(key):
                bad.append(f"{w.name}: {key}")
        if any("hostPath" in v for v in spec.get("volumes", [])):
            bad.append(f"{w.name}: hostPath volume")
        sa = spec.get("serviceAccountName")
        if sa:
            obj = get(docs, "ServiceAccount", sa)
            if obj is None or obj.get("automountServiceAccountToken") is not False:
                bad.append(f"{w.name}: ServiceAccount {sa} missing or mounting tokens")
        for c in w.all_containers:
            sc = c.get("securityContext", {})
            where = f"{w.name}/{c['name']}"
            if sc.get("allowPrivilegeEscalation") is not False:
                bad.append(f"{where}: allowPrivilegeEscalation must be false")
            if sc.get("readOnlyRootFilesystem") is not True:
                bad.append(f"{where}: readOnlyRootFilesystem must be true")
            if sc.get("capabilities", {}).get("drop") != ["ALL"] or sc.get("capabilities", {}).get("add"):
                bad.append(f"{where}: capabilities must drop ALL and add none")
            if sc.get("privileged"):
                bad.append(f"{where}: privileged")
            if sc.get("runAsUser") == 0:
                bad.append(f"{where}: runs as root")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        bad.append(f"{where}: resources.{kind}.{r} missing")
    assert not bad, "\n".join(bad)


def test_writable_paths_are_volumes(docs):
    """With a read-only root filesystem, /tmp must be a volume for the Python services."""
    for w in workloads(docs):
        if w.labels.get(COMPONENT) in settings_classes():
            mounts = {m["mountPath"] for m in main_container(w)["volumeMounts"]}
            assert "/tmp" in mounts, f"{w.name}: /tmp"


def test_images_are_pinned(docs):
    for w in workloads(docs):
        for c in w.all_containers:
            image = c["image"]
            name, _, tag = image.rpartition(":")
            assert "@sha256:" in image or (name and tag and "/" not in tag and tag != "latest"), f"{w.name}: {image}"


def test_secrets_are_marked_placeholders(docs):
    for s in objs(docs, "Secret"):
        assert s["metadata"].get("annotations", {}).get("glimprouter.dev/placeholder") == "true", s["metadata"]["name"]
        assert "data" not in s, f"{s['metadata']['name']}: placeholders are plain stringData"
        for k, v in s["stringData"].items():
            assert "PLACEHOLDER" in v, f"Secret {s['metadata']['name']}/{k} holds something that is not a placeholder"


def test_jaeger_ui_is_not_published(docs):
    for ing in objs(docs, "Ingress"):
        backends = {p["backend"]["service"]["name"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]}
        assert backends == {"gateway"}
        assert {p["path"] for r in ing["spec"]["rules"] for p in r["http"]["paths"]} == {"/v1"}
    for svc in objs(docs, "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", f"{svc['metadata']['name']} is exposed"


# ---- 9. images ------------------------------------------------------------------------------
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_one_dockerfile_per_image():
    assert {p.name for p in DOCKERFILES} == {
        "router.Dockerfile", "gateway.Dockerfile", "worker-cpu.Dockerfile", "worker-trtllm.Dockerfile"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multistage_pinned_and_non_root(path):
    ins = _instructions(path)
    args = {}
    for op, rest in ins:
        if op == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            args[k] = v.strip('"')
    froms = [rest.split()[0] for op, rest in ins if op == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    stages = {rest.split()[-1] for op, rest in ins if op == "FROM" and " AS " in rest.upper()}
    for f in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), f)
        if image in stages:
            continue
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "$" not in image, f"{path.name}: base image {image} is not pinned"
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{path.name}: the last stage runs as root"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), "a numeric USER, so runAsNonRoot can verify it"
    assert any(op == "ENTRYPOINT" for op, _ in ins)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_every_package_and_runs_a_real_module(path):
    from setuptools import find_packages

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    tops = set()
    for where in cfg["where"]:
        pkgs = find_packages(where=str(ROOT / where), include=cfg["include"])
        tops |= {p.split(".")[0] for p in pkgs} if where == "." else ({where} if pkgs else set())
    ins = _instructions(path)
    copied = {rest.split()[0] for op, rest in ins if op == "COPY" and not rest.startswith("--from")}
    assert tops <= copied, f"{path.name} does not copy {sorted(tops - copied)}"
    ignore = (ROOT / ".dockerignore").read_text().split()
    for src in copied:
        assert f"!{src}" in ignore or f"!{src}/" in ignore, f".dockerignore leaves {src} out of the build context"
    entry = json.loads(next(rest for op, rest in ins if op == "ENTRYPOINT"))
    assert entry[1] == "-m"
    module = ROOT / Path(*entry[2].split("."))
    assert (module / "__main__.py").is_file(), f"{path.name}: python -m {entry[2]} has no __main__"


def test_requirements_lists_follow_pyproject():
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        import requirements as reqs
    finally:
        sys.path.pop(0)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    cpu = reqs.requirements()
    assert cpu == project["dependencies"]
    gpu = reqs.requirements(extras=["trtllm"], exclude=["llama-cpp-python"])
    assert not any(reqs.requirement_name(r) == "llama-cpp-python" for r in gpu)
    assert any(reqs.requirement_name(r) == "tensorrt-llm" for r in gpu)
    with pytest.raises(KeyError):
        reqs.requirements(extras=["no-such-extra"])
    with pytest.raises(KeyError):
        reqs.requirements(exclude=["not-a-dependency"])
    trt = (ROOT / "docker" / "worker-trtllm.Dockerfile").read_text()
    assert "--extra trtllm" in trt and "nvcr.io/nvidia/tensorrt-llm/release:" in trt


# ---- 10. the deploy guide's manifests validate too ------------------------------------------
def test_deploy_guide_yaml_validates():
    import kubernetes_validate

    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/deploy.md shows its manifests as yaml blocks"
    for block in blocks:
        if "(excerpt)" in block.splitlines()[0]:
            continue
        for d in yaml.safe_load_all(block):
            if d and "apiVersion" in d and "kind" in d:
                kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
