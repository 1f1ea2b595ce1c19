"""Deployment files hold together: the kustomization renders and validates against a current Kubernetes schema,
the Prometheus operator objects point at real ports, the Grafana dashboard and the Prometheus files are well
formed, and every flag that a manifest, Dockerfile or systemd unit passes is one `gpupool serve --help` or
`gpupool scheduler --help` documents."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_HA = DEPLOY / "k8s-ha"  # an overlay of K8S (kustomize refuses one inside its base)
# Kubernetes version the manifests are validated against: the newest one kubernetes-validate knows.
K8S_VERSION = kubernetes_validate.latest_version()
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}
# GPUPOOL_* variables that are read outside argparse (gpupool/config.py, gpupool/tokens.py).
NON_FLAG_ENV = {"GPUPOOL_LOG_LEVEL", "GPUPOOL_TLS_VERIFY_HOST_ID"}
FLAG_RE = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")


# ---------------------------------------------------------------- rendering the kustomization


def render_kustomization(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k` would create: resources, generated Secrets, namespace, labels, images.

    A small renderer of the kustomize features this kustomization uses, so the test runs without kubectl.
    """
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for resource in kust.get("resources", []):
        if (directory / resource).is_dir():  # a base this overlay builds on
            objects += render_kustomization((directory / resource).resolve())
            continue
        objects += [doc for doc in yaml.safe_load_all((directory / resource).read_text()) if doc]
    for patch in kust.get("patches", []):  # strategic merge patches (the subset the overlays use)
        doc = yaml.safe_load((directory / patch["path"]).read_text())
        ident = (doc["kind"], doc["metadata"]["name"])
        targets = [o for o in objects if (o["kind"], o["metadata"]["name"]) == ident]
        assert targets, f"{patch['path']} patches {ident}, which is not there"
        if doc.pop("$patch", None) == "delete":
            objects = [o for o in objects if all(o is not t for t in targets)]
        else:
            for target in targets:
                strategic_merge(target, doc)
    for gen in kust.get("secretGenerator", []):
        # The key file is the operator's (git-ignored); its content does not matter for validation.
        data = {Path(f).name: "c2VjcmV0" for f in gen.get("files", [])}
        objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": gen["name"]}, "data": data})
    images = {i["name"]: i for i in kust.get("images", [])}
    labels: dict[str, str] = {}
    for entry in kust.get("labels", []):
        labels.update(entry.get("pairs", {}))
    for obj in objects:
        meta = obj.setdefault("metadata", {})
        if kust.get("namespace") and obj["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = kust["namespace"]
        meta.setdefault("labels", {}).update(labels)
        for container in pod_spec(obj).get("containers", []) if pod_spec(obj) else []:
            name = container["image"].split(":")[0]
            if name in images:
                container["image"] = f"{images[name].get('newName', name)}:{images[name]['newTag']}"
    return objects


def strategic_merge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    """Kubernetes' strategic merge, as far as the overlays use it: maps merge, null deletes, lists of objects
    merge by their merge key (name; mountPath for volumeMounts) with `$patch: delete`, other lists replace."""
    for k, v in patch.items():
        if v is None:
            base.pop(k, None)
        elif isinstance(v, dict) and isinstance(base.get(k), dict):
            strategic_merge(base[k], v)
        elif isinstance(v, list) and v and all(isinstance(i, dict) for i in v) and isinstance(base.get(k), list):
            key = "mountPath" if k == "volumeMounts" else "name"
            for item in v:
                match = next((b for b in base[k] if b.get(key) == item.get(key)), None)
                if item.get("$patch") == "delete":
                    assert match is not None, f"patch deletes {k} {item.get(key)}, which is not there"
                    base[k] = [b for b in base[k] if b is not match]
                elif match is not None:
                    strategic_merge(match, item)
                else:
                    base[k].append(item)
        else:
            base[k] = v


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    if obj["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
        return obj["spec"]["template"]["spec"]
    return {}


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return render_kustomization(K8S)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def test_every_listed_resource_exists_and_token_key_is_ignored() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kust["resources"]:
        assert (K8S / resource).is_file(), f"kustomization.yaml lists missing {resource}"
    ignored = (K8S / ".gitignore").read_text().split()
    for gen in kust.get("secretGenerator", []):
        for f in gen.get("files", []):
            assert f in ignored, f"secret file {f} must be git-ignored"


def test_manifests_validate_against_kubernetes_schema(objects: list[dict[str, Any]]) -> None:
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "DaemonSet", "Secret", "ConfigMap"} <= kinds
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {K8S_VERSION}: {exc}")


def test_kubectl_kustomize_renders_when_available(tmp_path: Path, objects: list[dict[str, Any]]) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the built-in renderer covered the kustomization")
    work = tmp_path / "k8s"
    shutil.copytree(K8S, work)
    for secret in ("token.key", "token.pub", "credentials"):
        (work / secret).write_text("not a real secret\n")
    out = subprocess.run([kubectl, "kustomize", str(work)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0 and "unknown command" in out.stderr:
        pytest.skip(f"this kubectl has no kustomize: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(o["kind"] for o in rendered) == sorted(o["kind"] for o in objects)
    for obj in rendered:
        if (obj["apiVersion"], obj["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _container(obj: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(obj)["containers"]
    return container


def _port(container: dict[str, Any], name: str) -> int:
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == name)


def test_workloads_wire_up(objects: list[dict[str, Any]]) -> None:
    (daemonset,) = by_kind(objects, "DaemonSet")
    (deployment,) = by_kind(objects, "Deployment")
    (service,) = by_kind(objects, "Service")
    (pvc,) = by_kind(objects, "PersistentVolumeClaim")
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    (configmap,) = by_kind(objects, "ConfigMap")
    daemon, sched = _container(daemonset), _container(deployment)
    # GPUs come from the device plugin, on GPU nodes only.
    assert int(daemon["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert pod_spec(daemonset).get("nodeSelector"), "the daemon must be pinned to GPU nodes"
    # Probes use Kubernetes' native gRPC health checks on the plaintext health-only port (kubelet cannot do TLS).
    for obj, container, volume, flag in (
        (daemonset, daemon, "token-public", "--token-public-keys"),
        (deployment, sched, "token-key", "--token-key-file"),
    ):
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == _port(container, "health"), (obj["kind"], probe)
        assert f"--health-listen=0.0.0.0:{_port(container, 'health')}" in container["args"]
        volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
        key = volumes[volume]["secret"]["secretName"]
        assert key in secrets, f"{obj['kind']} mounts secret {key}, the kustomization makes another"
        mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume)
        assert f"{flag}={mount}/{next(iter(secrets[key]['data']))}" in container["args"]
        # TLS on: certificate, key and CA from the mounted "tls" volume; never --insecure.
        tls_mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "tls")
        for f, name in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key"), ("--tls-ca", "ca.crt")):
            assert f"{f}={tls_mount}/{name}" in container["args"], (obj["kind"], f)
        assert not any("insecure" in a for a in container["args"])
        assert container["envFrom"][0]["configMapRef"]["name"] == configmap["metadata"]["name"]
        # The metrics flag binds the port the monitors scrape.
        assert f"--metrics-listen=0.0.0.0:{_port(container, 'metrics')}" in container["args"]
        assert any(a.startswith(f"--listen=0.0.0.0:{_port(container, 'grpc')}") for a in container["args"])
    # Daemons get public keys only; the private signing key is mounted in the scheduler alone.
    assert "token-key" not in {v["name"] for v in pod_spec(daemonset)["volumes"]}
    # The scheduler keeps its state on the claimed volume; one replica, never two on one database.
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    state_mount = next(m["mountPath"] for m in sched["volumeMounts"] if m["name"] == "state")
    assert any(a.startswith(f"--state={state_mount}/") for a in sched["args"])
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    # The service selects the scheduler pods and exposes its gRPC port, which the daemons dial.
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert f"--scheduler={service['metadata']['name']}:{grpc_port}" in daemon["args"]


def test_prometheus_operator_monitors_match_ports(objects: list[dict[str, Any]]) -> None:
    (podmon,) = by_kind(objects, "PodMonitor")
    (servicemon,) = by_kind(objects, "ServiceMonitor")
    (daemonset,) = by_kind(objects, "DaemonSet")
    (service,) = by_kind(objects, "Service")
    for mon in (podmon, servicemon):
        assert mon["apiVersion"] == "monitoring.coreos.com/v1"
        assert set(mon["metadata"]) >= {"name", "namespace"}
    pod_labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert podmon["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    daemon_ports = {p["name"] for p in _container(daemonset)["ports"]}
    for ep in podmon["spec"]["podMetricsEndpoints"]:
        assert ep["port"] in daemon_ports and ep["path"] == "/metrics"
    assert servicemon["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for ep in servicemon["spec"]["endpoints"]:
        assert ep["port"] in service_ports and ep["path"] == "/metrics"


# ---------------------------------------------------------------- flags used by deploy files vs --help


def _program_of(words: list[str]) -> str | None:
    for program in ("serve", "scheduler"):
        if program in words:
            return program
    return None


def _entrypoint_and_cmd(path: Path) -> tuple[list[str], list[str]]:
    """A Dockerfile's ENTRYPOINT and CMD (exec form, one line each)."""
    text = path.read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    return entry, cmd


def deploy_flags() -> dict[str, set[tuple[str, str]]]:
    """{program: {(flag, where)}} for every flag the deploy files pass to `gpupool serve` / `gpupool scheduler`."""
    found: dict[str, set[tuple[str, str]]] = {"serve": set(), "scheduler": set()}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc["kind"] == "ConfigMap":
                for env in doc["data"]:
                    if env not in NON_FLAG_ENV:
                        # Shared by both workloads; a variable must be a flag of at least one program.
                        found.setdefault("either", set()).add(("--" + env[8:].lower().replace("_", "-"), path.name))
                continue
            for container in pod_spec(doc).get("containers", []) if pod_spec(doc) else []:
                words = [*container.get("command", []), *container.get("args", [])]
                program = _program_of(words)
                assert program, f"{path.name}: cannot tell which program {words} runs"
                found[program] |= {(m, path.name) for w in words for m in ["--" + x for x in FLAG_RE.findall(w)]}
    for path in sorted((DEPLOY / "docker").glob("Dockerfile.*")):
        text = path.read_text()
        entry, cmd = _entrypoint_and_cmd(path)
        program = _program_of(entry)
        assert program, f"{path.name}: ENTRYPOINT {entry} runs neither serve nor scheduler"
        found[program] |= {("--" + f, path.name) for w in [*entry, *cmd] for f in FLAG_RE.findall(w)}
    for path in sorted((DEPLOY / "systemd").glob("*.service")):
        text = path.read_text().replace("\\\n", " ")
        exec_start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1).split()  # type: ignore[union-attr]
        program = _program_of(exec_start)
        assert program, f"{path.name}: ExecStart runs neither serve nor scheduler"
        found[program] |= {("--" + f, path.name) for w in exec_start for f in FLAG_RE.findall(w)}
        for env in re.findall(r"GPUPOOL_[A-Z_]+", text):
            if env not in NON_FLAG_ENV:
                found[program].add(("--" + env[8:].lower().replace("_", "-"), path.name))
    return found


def program_help(program: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "gpupool.cli", program, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, f"gpupool {program} --help failed:\n{out.stderr}"
    return out.stdout


def test_every_deploy_flag_is_documented_in_help() -> None:
    found = deploy_flags()
    assert {f for f, _ in found["serve"]} >= {"--listen", "--metrics-listen", "--token-public-keys", "--tls-cert"}
    assert {f for f, _ in found["scheduler"]} >= {
        "--listen",
        "--metrics-listen",
        "--state",
        "--token-key-file",
        "--tls-ca",
    }
    helps = {p: set(FLAG_RE.findall(program_help(p))) for p in ("serve", "scheduler")}
    missing = [
        f"{where}: gpupool {program} {flag}"
        for program in ("serve", "scheduler")
        for flag, where in sorted(found[program])
        if flag[2:] not in helps[program]
    ]
    missing += [
        f"{where}: GPUPOOL_{flag[2:].upper().replace('-', '_')} is a flag of neither program"
        for flag, where in sorted(found.get("either", set()))
        if flag[2:] not in helps["serve"] | helps["scheduler"]
    ]
    assert not missing, "flags used in deploy/ but not in --help:\n" + "\n".join(missing)


# ---------------------------------------------------------------- Grafana and Prometheus files


def test_grafana_dashboard_is_well_formed() -> None:
    dash = json.loads((DEPLOY / "grafana" / "gpupool.json").read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("host", "device"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("pool", "memory allocated vs used", "per tenant", "op rate", "errors", "leases", "latency"):
        assert topic in titles, f"no panel about {topic!r}"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


def test_alert_rules_are_well_formed() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    for required in ("GpupoolHostDown", "GpupoolPoolAlmostFull", "GpupoolErrorsRising", "GpupoolAllocationsFailing"):
        assert required in alerts
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    ops = (ROOT / "docs" / "operations.md").read_text()
    for name in alerts:
        assert name in ops, f"docs/operations.md does not explain alert {name}"


def test_prometheus_files_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool missing in CI: scripts/setup.sh installs the Debian prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    # promtool checks that the files of a scrape job's tls_config exist: the config's own folder, with stand-ins of
    # the CA and Prometheus' client certificate where prometheus.yml names them (relative to that folder)
    for name in ("prometheus.yml", "rules.yml"):
        shutil.copy(DEPLOY / "prometheus" / name, tmp_path / name)
    config = yaml.safe_load((tmp_path / "prometheus.yml").read_text())
    named = {f for job in config["scrape_configs"] for k, f in job.get("tls_config", {}).items() if k.endswith("_file")}
    assert named, "prometheus.yml scrapes without client certificates: the metrics endpoints refuse that"
    for f in named:
        assert not Path(f).is_absolute(), f
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("stand-in\n")
    for args in (["check", "rules", "rules.yml"], ["check", "config", "prometheus.yml"]):
        out = subprocess.run([promtool, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------- containers and systemd units


def test_dockerfiles_copy_what_the_package_needs() -> None:
    """Every COPY source exists, and the package-dir folders of pyproject.toml are all copied before `pip install .`."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    package_dirs = {d.split("/")[0] for d in re.findall(r'"gpupool[.\w]*" = "([^"]+)"', pyproject)}
    assert package_dirs >= {"gpupool", "server", "scheduler", "client"}
    for path in sorted((DEPLOY / "docker").glob("Dockerfile.*")):
        copies = [line.split()[1:-1] for line in path.read_text().splitlines() if line.startswith("COPY ")]
        sources = {src.rstrip("/") for srcs in copies for src in srcs}
        for src in sources:
            assert (ROOT / src).exists(), f"{path.name}: COPY {src} does not exist"
        assert package_dirs | {"pyproject.toml"} <= sources, f"{path.name} misses {package_dirs - sources}"
        exposed = {int(p) for line in re.findall(r"^EXPOSE (.*)$", path.read_text(), re.M) for p in line.split()}
        cmd = " ".join(sum(_entrypoint_and_cmd(path), []))
        for port in re.findall(r"0\.0\.0\.0:(\d+)", cmd):
            assert int(port) in exposed, f"{path.name}: listens on {port} but does not EXPOSE it"


def _documented_docker_runs() -> list[tuple[str, list[str]]]:
    """(where, the words of a `docker run` command) in the Dockerfiles' header comments and docs/operations.md,
    continuation lines joined."""
    runs = []
    for path in [*sorted((DEPLOY / "docker").glob("Dockerfile.*")), ROOT / "docs" / "operations.md"]:
        lines = [re.sub(r"^#\s*", "", line) if path.suffix != ".md" else line for line in path.read_text().splitlines()]
        text = "\n".join(lines).replace("\\\n", " ")
        runs += [(path.name, shlex.split(m)) for m in re.findall(r"^\s*(docker run .*)$", text, re.M)]
    return runs


def test_each_documented_docker_run_serves_as_the_image_means() -> None:
    """`docker run IMAGE ARGS` runs ENTRYPOINT + ARGS, ARGS in place of CMD (docker's rule for exec-form ENTRYPOINT and
    CMD): each documented run of an image with its own entrypoint (not `--entrypoint gpupool ... smi`) parses, with
    the program's own parser, to a listener on 0.0.0.0 at the port it publishes, metrics there too, TLS and the token
    key from the mounted /etc/gpupool, and the flags the example adds. Until round 44 the daemon's example (a
    --scheduler and --advertise after the image) dropped CMD's --listen, --token-public-keys and TLS files: a daemon
    on 127.0.0.1 that would not start without a certificate."""
    from gpupool.scheduler.cli import build_parser as scheduler_parser
    from gpupool.server.cli import build_parser as serve_parser

    images = {"gpupool/daemon": "Dockerfile.daemon", "gpupool/scheduler": "Dockerfile.scheduler"}
    checked = set()
    for where, words in _documented_docker_runs():
        if "--entrypoint" in words:
            continue
        [at] = [i for i, w in enumerate(words) if w.split(":")[0] in images]
        dockerfile = images[words[at].split(":")[0]]
        entry, cmd = _entrypoint_and_cmd(DEPLOY / "docker" / dockerfile)
        args = words[at + 1 :]
        program = _program_of(entry)
        parser = serve_parser() if program == "serve" else scheduler_parser()
        parsed = parser.parse_args(entry[entry.index(program) + 1 :] + (args or cmd))
        published = {int(p.split(":")[-1]) for i, p in enumerate(words[:at]) if words[i - 1] == "-p"}
        assert parsed.listen.startswith("0.0.0.0:") and int(parsed.listen.split(":")[1]) in published, (where, words)
        assert parsed.metrics_listen.startswith("0.0.0.0:") and int(parsed.metrics_listen.split(":")[1]) in published
        assert (parsed.tls_cert, parsed.tls_key, parsed.tls_ca) == tuple(
            f"/etc/gpupool/tls/{f}" for f in ("tls.crt", "tls.key", "ca.crt")
        ), (where, words)
        if program == "serve":
            assert parsed.token_public_keys == "/etc/gpupool/token.pub", (where, words)
            assert parsed.scheduler == "sched.example.internal:50050" and parsed.advertise.endswith(":50051")
        else:
            assert parsed.token_key_file == "/etc/gpupool/token.key" and parsed.state.startswith("/var/lib/gpupool/")
        checked.add((where, dockerfile))
    assert checked >= {(f"Dockerfile.{n}", f"Dockerfile.{n}") for n in ("daemon", "scheduler")}
    assert {d for w, d in checked if w == "operations.md"} == {"Dockerfile.daemon", "Dockerfile.scheduler"}


def test_systemd_units_verify() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    units = sorted(str(p) for p in (DEPLOY / "systemd").glob("*.service"))
    assert len(units) == 2
    out = subprocess.run([analyze, "verify", *units], capture_output=True, text=True, timeout=60)
    # The installed program is the only thing this machine lacks (/opt/gpupool/bin/gpupool).
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if line.strip() and "/opt/gpupool/bin/gpupool" not in line
    ]
    assert not problems, "\n".join(problems)


def test_ha_overlay_runs_standby_replicas_on_postgresql(tmp_path: Path) -> None:
    """deploy/k8s-ha: the base without its SQLite scheduler, plus 2+ replicas that lead or stand by."""
    objects = render_kustomization(K8S_HA)
    kubectl = shutil.which("kubectl")
    if kubectl is not None:  # the real kustomize agrees with the test's renderer
        shutil.copytree(K8S, tmp_path / "k8s")
        shutil.copytree(K8S_HA, tmp_path / "k8s-ha")
        for secret in ("token.key", "token.pub", "credentials"):
            (tmp_path / "k8s" / secret).write_text("not a real secret\n")
        out = subprocess.run(
            [kubectl, "kustomize", str(tmp_path / "k8s-ha")], capture_output=True, text=True, timeout=60
        )
        if "unknown command" not in out.stderr:
            assert out.returncode == 0, out.stderr
            rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
            assert sorted(o["kind"] for o in rendered) == sorted(o["kind"] for o in objects)
            (real,) = [o for o in rendered if o["kind"] == "Deployment"]
            secret = next(
                o["metadata"]["name"]
                for o in rendered
                if o["kind"] == "Secret" and o["metadata"]["name"].startswith("gpupool-token-key")
            )
            volumes = {v["name"]: v for v in pod_spec(real)["volumes"]}
            assert volumes["token-key"]["secret"]["secretName"] == secret  # the generated name, hash suffix and all
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) not in CRD_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert not by_kind(objects, "PersistentVolumeClaim")
    (daemonset,) = by_kind(objects, "DaemonSet")
    (service,) = by_kind(objects, "Service")
    (deployment,) = by_kind(objects, "Deployment")
    sched = _container(deployment)
    assert deployment["spec"]["replicas"] >= 2 and "--standby" in sched["args"]
    # the patch's args replace the base's list whole: until fin40 it dropped --tls-cert/--tls-key/--tls-ca (the
    # scheduler refuses to start without them), --credentials and --health-listen (its readiness probe's port)
    (base,) = by_kind(render_kustomization(K8S), "Deployment")
    kept = [a for a in _container(base)["args"] if not a.startswith("--state")]
    assert [a for a in kept if a not in sched["args"]] == [], sched["args"]
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert not any(a.startswith("--state") for a in sched["args"])
    assert "state" not in {v["name"] for v in pod_spec(deployment)["volumes"]}
    assert "state" not in {m["name"] for m in sched["volumeMounts"]}
    helps = subprocess.run(
        [sys.executable, "-m", "gpupool.cli", "scheduler", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    for arg in sched["args"]:
        assert arg.split("=")[0] in helps, f"{arg} is not a flag of gpupool scheduler"
    (state,) = [e for e in sched["env"] if e["name"] == "GPUPOOL_STATE"]
    assert state["valueFrom"]["secretKeyRef"]["key"] == "dsn"
    # only the leader is ready (gRPC health), yet a standby is alive: the Service routes to the leader alone
    assert sched["readinessProbe"]["grpc"]["port"] == _port(sched, "health")  # the plaintext health-only port
    assert "grpc" not in sched["livenessProbe"] and sched["livenessProbe"]["tcpSocket"]["port"] == _port(sched, "grpc")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert f"--scheduler={service['metadata']['name']}:{grpc_port}" in _container(daemonset)["args"]


# ---------------------------------------------------------------- the daemon's client certificates and state folder


def _serve_args(words: list[str]) -> Any:
    """`gpupool serve`'s own parser over the arguments after `serve` in `words`."""
    from gpupool.server.cli import build_parser

    return build_parser().parse_args(words[words.index("serve") + 1 :])


def _systemd_exec_start(name: str) -> list[str]:
    text = (DEPLOY / "systemd" / name).read_text().replace("\\\n", " ")
    return re.search(r"^ExecStart=(.*)$", text, re.M).group(1).split()  # type: ignore[union-attr]


def test_the_deployed_daemons_require_client_certificates() -> None:
    """The systemd unit, the DaemonSet and the daemon image's ENTRYPOINT run the daemon with `--tls-client-auth
    require` (their schedulers require client certificates too, so every client has one): only then does a daemon
    refuse revoked certificates and hold lease tokens to the certificate they were allocated with (round 46). Until
    round 46 all three asked for none (serve's default), and certificate revocation was moot at their daemons."""
    from gpupool import tls

    (daemonset,) = by_kind(render_kustomization(K8S), "DaemonSet")
    container = _container(daemonset)
    entry, cmd = _entrypoint_and_cmd(DEPLOY / "docker" / "Dockerfile.daemon")
    for where, words in (
        ("systemd", _systemd_exec_start("gpupool-daemon.service")),
        ("k8s", [*container["command"], *container["args"]]),
        ("docker", [*entry, *cmd]),
    ):
        cfg = tls.config_from_args(_serve_args(words))
        assert cfg.verifies_clients and cfg.ca, (where, words)
    for name in ("gpupool-scheduler.service",):  # (the scheduler's default is require: no flag says otherwise)
        assert "--tls-client-auth" not in " ".join(_systemd_exec_start(name))


def test_the_daemonsets_state_dir_is_one_the_folder_check_accepts(tmp_path: Path) -> None:
    """The DaemonSet keeps its revocations (`--state-dir`) on an emptyDir volume, which kubelet makes 0777 and root's:
    the daemon's folder check refuses that as the daemon's user (10001). Its init container's command, run as root on
    such a folder here, makes it one the check (`RevocationFile`, as the daemon opens it) accepts as that user. Until
    round 46 the DaemonSet had no --state-dir (its revocations lost at every restart). Not tested here: that kubelet
    runs the init container as root before the daemon (a namespace under Pod Security "restricted" refuses a root
    container; "baseline" admits it) and makes an emptyDir as said."""
    (daemonset,) = by_kind(render_kustomization(K8S), "DaemonSet")
    spec = pod_spec(daemonset)
    container = _container(daemonset)
    state_dir = _serve_args([*container["command"], *container["args"]]).state_dir
    assert state_dir, "the DaemonSet's daemon keeps no revocations (--state-dir)"
    volumes = {v["name"]: v for v in spec["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == state_dir]
    assert volumes[mount["name"]].get("emptyDir") is not None and not mount.get("readOnly")
    (init,) = [c for c in spec.get("initContainers", []) if any(m["name"] == mount["name"] for m in c["volumeMounts"])]
    (init_mount,) = [m["mountPath"] for m in init["volumeMounts"] if m["name"] == mount["name"]]
    user = spec["securityContext"]["runAsUser"]
    assert container.get("securityContext", {}).get("runAsUser", user) == user == 10001
    if os.geteuid() != 0:
        pytest.skip("the init step's check runs as root (chown) and as the daemon's user")

    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        base.chmod(0o755)  # (the daemon's user reaches the folder; /tmp above it is sticky)
        folder = base / "state"
        folder.mkdir()
        folder.chmod(0o777)  # as kubelet makes an emptyDir
        assert _open_state_as(user, folder) != 0, "the folder check accepted a 0777 folder"
        command = [str(folder) if w == init_mount else w for w in init["command"]]
        assert str(folder) in command, init["command"]
        subprocess.run(command, check=True, timeout=30)
        assert _open_state_as(user, folder) == 0, (oct(folder.stat().st_mode), folder.stat().st_uid)
        assert (folder / "revocations.key").stat().st_uid == user
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _open_state_as(uid: int, folder: Path) -> int:
    """0 if `RevocationFile(folder)` (the daemon's own opening of its --state-dir: the folder check, its key) succeeds
    in a child process running as `uid`, else 1."""
    from gpupool.server.revocations import RevocationFile

    pid = os.fork()
    if pid == 0:  # (the child: stat and a key file, then out without the parent's teardown)
        code = 1
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            RevocationFile(folder, "h46")
            code = 0
        except BaseException:  # noqa: BLE001 - any refusal is the answer
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
