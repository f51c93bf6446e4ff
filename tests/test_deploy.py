"""The deployments in deploy/: valid against the Kubernetes and compose-spec schemas (offline,
from the schemas the test extra's packages ship), saying what the product plan says (probes,
autoscaling, the meter), and naming only metrics a running gateway (or, ``tollway_meter_*``, a
running meter) really exposes."""

from __future__ import annotations

import copy
import json
import re
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import kubernetes_validate
import pytest
import yaml

from proxy.policy import PolicyError, load_text
from tests.conftest import ADMIN_KEY
from tests.procs import until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
KUBE = DEPLOY / "kubernetes"
KUBE_VERSION = "1.31"  # the oldest Kubernetes the manifests are checked against
METRIC = re.compile(r"\btollway_[a-z_]+\b")
METER_METRIC = "tollway_meter_"  # the prefix of what the meter exposes, not a gateway
SEALING_KEY = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="  # 32 bytes, base64
SECRETS = {
    "TOLLWAY_ADMIN_KEY": ADMIN_KEY,
    "TOLLWAY_CACHE_KEY": SEALING_KEY,
    "TOLLWAY_RESPONSES_KEY": SEALING_KEY,
    "TOLLWAY_IP_HASH_KEY": SEALING_KEY,
    "OPENAI_API_KEY": "upstream-secret",
    "ANTHROPIC_API_KEY": "upstream-secret",
}


def manifests() -> list[dict[str, Any]]:
    """Every Kubernetes object of deploy/kubernetes/, each with the file it came from."""
    out = []
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append({**doc, "_file": path.name})
    return out


def one(kind: str, name: str) -> dict[str, Any]:
    found = [m for m in manifests() if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def kube_errors(doc: dict[str, Any]) -> list[str]:
    """Why ``doc`` is not a valid object of its kind (strict: unknown fields too); [] if it is."""
    body = {k: v for k, v in doc.items() if k != "_file"}
    try:
        kubernetes_validate.validate(body, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc.get('_file')}: {doc['kind']}: {e.message} at {list(e.path)}"]
    return []


def compose_errors(doc: dict[str, Any]) -> list[str]:
    """Why ``doc`` is not a valid compose file, per the compose-spec schema check-jsonschema
    vendors (Apache-2.0, from github.com/compose-spec/compose-spec)."""
    schema_file = resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]


def deploy_policy() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "policies.yaml").read_text())  # type: ignore[no-any-return]


def env_names(node: Any) -> set[str]:
    """The environment variables a policy's ``{$env: NAME}`` secrets name."""
    if isinstance(node, dict):
        if set(node) == {"$env"}:
            return {node["$env"]}
        return set().union(*map(env_names, node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*map(env_names, node)) if node else set()
    return set()


def test_kubernetes_manifests_are_valid() -> None:
    docs = manifests()
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "StatefulSet",
    } <= kinds
    assert [e for d in docs for e in kube_errors(d)] == []
    # the check is strict: a misspelt field is caught
    broken = copy.deepcopy(one("Deployment", "tollway-gateway"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert kube_errors(broken) != []


def test_compose_file_is_valid() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose_errors(compose) == []
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["portz"] = ["6379:6379"]
    assert compose_errors(broken) != []


def test_compose_runs_gateways_meter_and_monitoring() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    gateways = [s for s in services.values() if s.get("command", [])[:2] == ["tollway", "serve"]]
    assert len(gateways) >= 2
    assert services["meter"]["command"][:2] == ["tollway", "meter"]
    assert {"redis", "prometheus", "grafana"} <= set(services)
    # each gateway owns its state.dir (a second gateway on one folder refuses to start)
    data = [v for g in gateways for v in g["volumes"] if v.endswith(":/app/data")]
    assert len(set(data)) == len(gateways)
    assert any(v.endswith(":/app/data") for v in services["meter"]["volumes"])
    # every file the services mount is in deploy/
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), source
    scraped = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = scraped["scrape_configs"][0]["static_configs"][0]["targets"]
    names = [n for n, s in services.items() if s in gateways]
    assert sorted(targets) == sorted(f"{n}:8080" for n in names)
    # the meter is scraped too, as a job of its own (the alerts tell it from the gateways)
    jobs = {c["job_name"]: c for c in scraped["scrape_configs"]}
    meter_port = services["meter"]["command"][services["meter"]["command"].index("--port") + 1]
    assert jobs["tollway-meter"]["static_configs"][0]["targets"] == [f"meter:{meter_port}"]
    assert jobs["tollway-meter"]["metrics_path"] == "/metrics"


def test_kubernetes_follows_the_scaling_plan() -> None:
    gateway = one("Deployment", "tollway-gateway")["spec"]["template"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["resources"]["requests"]["cpu"]  # the HPA's percentages need requests
    assert gateway["resources"]["requests"]["memory"]
    hpa = one("HorizontalPodAutoscaler", "tollway-gateway")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "tollway-gateway"
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 20)
    targets = {}
    for m in hpa["metrics"]:
        if m["type"] == "Resource":
            targets[m["resource"]["name"]] = m["resource"]["target"]["averageUtilization"]
        else:
            targets[m["pods"]["metric"]["name"]] = int(m["pods"]["target"]["averageValue"])
    assert targets == {"cpu": 70, "memory": 80, "tollway_admission_queue_length": 50}
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    adapter = yaml.safe_load(one("ConfigMap", "prometheus-adapter-tollway")["data"]["config.yaml"])
    assert adapter["rules"][0]["name"]["as"] == "tollway_admission_queue_length"
    pdb = one("PodDisruptionBudget", "tollway-gateway")["spec"]
    assert (
        pdb["selector"]["matchLabels"]
        == one("Deployment", "tollway-gateway")["spec"]["selector"]["matchLabels"]
    )


def test_kubernetes_meter_is_one_pod_with_a_volume() -> None:
    meter = one("StatefulSet", "tollway-meter")["spec"]
    assert meter["replicas"] == 1
    claims = [c["metadata"]["name"] for c in meter["volumeClaimTemplates"]]
    container = meter["template"]["spec"]["containers"][0]
    assert container["args"][:2] == ["tollway", "meter"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claims[0]] == "/app/data"  # where the policy's data/usage.duckdb lands
    # scraped as the gateways are, on the meter's own port
    scrape = meter["template"]["metadata"]["annotations"]
    gateway = one("Deployment", "tollway-gateway")["spec"]["template"]["metadata"]["annotations"]
    assert set(scrape) == set(gateway) and scrape["prometheus.io/path"] == "/metrics"
    assert scrape["prometheus.io/scrape"] == "true"
    assert container["ports"][0]["containerPort"] == int(scrape["prometheus.io/port"])
    assert container["args"][container["args"].index("--port") + 1] == scrape["prometheus.io/port"]


def test_kubernetes_policy_and_secrets_match_the_policy() -> None:
    policy = yaml.safe_load(one("ConfigMap", "tollway-policy")["data"]["policies.yaml"])
    assert policy == deploy_policy()
    secret = one("Secret", "tollway-secrets")["stringData"]
    assert set(secret) == env_names(deploy_policy()) == set(SECRETS)
    example = (DEPLOY / "env.example").read_text()
    assert {line.split("=")[0] for line in example.splitlines() if "=" in line} == set(SECRETS)


def test_only_the_providers_a_policy_lists_need_a_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    with pytest.raises(PolicyError, match="ANTHROPIC_API_KEY"):
        load_text(yaml.safe_dump(deploy_policy()), base=tmp_path)
    # without the anthropic provider (and what names it), its key is not asked for
    data = deploy_policy()
    del data["providers"]["anthropic"], data["models"]["claude-sonnet"]
    routing = next(c for c in data["chain"] if c["name"] == "routing")
    del routing["config"]["fallbacks"]
    loaded = load_text(yaml.safe_dump(data), base=tmp_path)
    assert set(loaded.policy.providers) == {"openai"}


def dashboard_metrics() -> set[str]:
    """Every metric name the Grafana dashboard, the alert rules, the HPA and the adapter name."""
    dashboard = json.loads((DEPLOY / "grafana" / "tollway.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs.append((DEPLOY / "alerts.yml").read_text())
    exprs.append((KUBE / "hpa.yaml").read_text())
    exprs.append((KUBE / "prometheus-adapter.yaml").read_text())
    return {m for e in exprs for m in METRIC.findall(e)}


async def test_every_metric_named_is_exposed(
    make_gateway: Any, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    data = deploy_policy()
    chain = data.pop("chain")
    data["providers"]["openai"]["base_url"] = "{emu}/v1"
    data["providers"]["anthropic"]["base_url"] = "{emu}"
    data["state"] = {"url": redis_url, "dir": str(tmp_path / "state")}
    data["listen"] = {"host": "127.0.0.1", "port": 0}
    for item in chain:
        if item["name"] == "metering":
            item["config"]["database"] = str(tmp_path / "usage.duckdb")
    gw = await make_gateway(chain, base=data)
    key = await gw.create_key("ops", "pro")
    client = gw.openai(key)
    msg = [{"role": "user", "content": "scrape me"}]
    await client.chat.completions.create(model="gpt-5.4-mini", messages=msg)
    async with gw.http.get(f"{gw.url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    named = {m for m in dashboard_metrics() if not m.startswith(METER_METRIC)}
    assert {"tollway_requests_total", "tollway_admission_queue_length"} <= named
    assert sorted(named - exposed) == []


async def test_every_meter_metric_named_is_exposed(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The meter of deploy/policies.yaml (its consumer thread, its app) over the suite's
    redis-server: every ``tollway_meter_*`` name the alerts and the dashboard use is scraped."""
    from tests.plugins.metering.conftest import running_meter

    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    data = deploy_policy()
    data["state"] = {"url": redis_url, "dir": str(tmp_path / "state")}
    for item in data["chain"]:
        if item["name"] == "metering":
            item["config"]["database"] = str(tmp_path / "usage.duckdb")
    named = {m for m in dashboard_metrics() if m.startswith(METER_METRIC)}
    assert {
        "tollway_meter_oldest_unloaded_age_seconds",
        "tollway_meter_redis_available",
        "tollway_meter_rows_loaded_total",
    } <= named
    async with running_meter(yaml.safe_dump(data)) as (site, _), aiohttp.ClientSession() as http:

        async def exposed() -> set[str]:
            async with http.get(f"{site}/metrics") as r:
                assert r.status == 200
                text = await r.text()
            return {
                line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"
            }

        async def all_named() -> bool:  # the backlog's figures: once the consumer measured it
            return named <= await exposed()

        await until(all_named, 10.0)
        assert sorted(named - await exposed()) == []


def test_dashboard_is_grafana_json() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "tollway.json").read_text())
    assert dashboard["uid"] == "tollway" and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
    source = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    assert source["datasources"][0]["uid"] == "prometheus"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_alert_rules_parse() -> None:
    import subprocess

    out = subprocess.run(
        ["promtool", "check", "rules", str(DEPLOY / "alerts.yml")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
