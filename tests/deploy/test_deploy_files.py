"""Docker files: no Docker engine runs here, so check what can be checked without one: the
compose file parses, wires Redis -> job -> service replicas -> nginx with health checks, sets only
MTRANK_* variables the service knows (with valid values), sizes workers and threads coherently,
keeps secrets out of the files, runs commands the CLI really has; the service image installs no
torch and runs as a non-root user. With a `docker compose` CLI, `docker compose config` too."""

import fnmatch
import importlib.util
import re
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
import yaml

from service.settings import Settings
from tests.deploy.readers import (
    ROOT,
    TEST_ENV,
    compose_cli,
    duration_s,
    env_of,
    healthcheck_cmd,
    interpolate,
    interpolation_vars,
    service_replicas,
)


def settings_from(env: dict[str, str], monkeypatch) -> Settings:
    """Settings as the container would build them from exactly ``env``."""
    import os

    for k in [k for k in os.environ if k.upper().startswith("MTRANK_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings(_env_file=None)


# -- wiring ---------------------------------------------------------------------------------------
def test_compose_wires_redis_job_replicas_and_balancer(compose):
    c = compose["services"]
    assert set(c) >= {"redis", "job", "service", "nginx", "prometheus", "grafana"}
    replicas = service_replicas(compose)
    assert sum(replicas.values()) >= 2, f"at least two service replicas, got {replicas}"
    for name in replicas:
        svc = c[name]
        env = env_of(svc)
        assert env["MTRANK_HOST"] == "0.0.0.0" and env["MTRANK_PORT"] == "8000"
        assert "ports" not in svc, "replicas publish no host port: clients go through nginx"
        assert svc["depends_on"]["job"]["condition"] == "service_completed_successfully"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "/readyz" in healthcheck_cmd(svc)
        assert svc.get("init") is True, "an init process reaps the uvicorn workers and forwards SIGTERM"
    assert "healthcheck" in c["redis"]
    nginx = c["nginx"]
    assert [interpolate(p, {}) for p in nginx["ports"]] == ["8000:80"]
    assert all(nginx["depends_on"][n]["condition"] == "service_healthy" for n in replicas)
    assert c["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in ("nginx", "prometheus", "grafana"):
        assert "healthcheck" in c[name], name
    # the monitoring UIs listen on loopback only
    for name, port in (("prometheus", 9090), ("grafana", 3000)):
        assert [interpolate(p, {}) for p in c[name]["ports"]] == [f"127.0.0.1:{port}:{port}"]
    for name in ("job", *replicas):
        env = env_of(c[name])
        url = urlsplit(env["MTRANK_REDIS_URL"])
        assert (url.scheme, url.hostname, url.port) == ("redis", "redis", 6379)
        assert env["MTRANK_MODEL_NAME"] == "demo"
    assert all(c[n]["build"]["target"] == "service" for n in replicas) and c["job"]["build"]["target"] == "trainer"


def test_compose_runs_the_events_consumer_next_to_the_replicas(compose):
    """POST /events through nginx only appends to a stream: without a consumer no sequence gets fresh."""
    c = compose["services"]
    ev = c["events"]
    assert ev["command"] == ["mtrank", "events", "consume"] and ev["build"]["target"] == "service"
    replica = c[next(iter(service_replicas(compose)))]
    env, renv = env_of(ev), env_of(replica)
    for k in ("MTRANK_REDIS_URL", "MTRANK_MODEL_STORE", "MTRANK_MODEL_NAME"):
        assert env[k] == renv[k], k  # the same Redis and the same held bundles as the replicas
    assert ev["volumes"] == ["models:/models:ro"] and ev["read_only"] is True
    assert ev["user"] == replica["user"] and ev["cap_drop"] == ["ALL"]
    assert ev["depends_on"]["job"]["condition"] == "service_completed_successfully"
    assert ev["depends_on"]["redis"]["condition"] == "service_healthy"
    assert ev["restart"] == "unless-stopped"
    local = yaml.safe_load((ROOT / "docker-compose.local.yml").read_text())["services"]
    assert local["events"]["image"] == local["service"]["image"], "the stand-in stack runs the same image"


def test_bind_mounted_files_exist(compose):
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                assert (ROOT / src).exists(), f"{name} mounts {src}, which is not in the repository"
                assert vol.endswith(":ro"), f"{name}: config mount {vol} should be read-only"


# -- settings -------------------------------------------------------------------------------------
def test_every_mtrank_variable_is_a_setting_with_a_valid_value(compose, monkeypatch):
    fields = {f"MTRANK_{name.upper()}" for name in Settings.model_fields}
    for name, svc in compose["services"].items():
        env = env_of(svc)
        unknown = sorted(k for k in env if k.startswith("MTRANK_") and k not in fields)
        assert not unknown, f"{name} sets {unknown}, which service/settings.py does not define"
        mtrank = {k: v for k, v in env.items() if k.startswith("MTRANK_")}
        if mtrank:
            settings_from(mtrank, monkeypatch)  # raises on an invalid value


def test_workers_threads_and_cpus_are_coherent(compose, monkeypatch):
    """W workers x T onnxruntime threads fit the replica's cpus limit. T must be explicit under a cpus
    limit: a quota does not change the cores a container sees, so cores / W would oversubscribe."""
    for name in service_replicas(compose):
        svc = compose["services"][name]
        s = settings_from({k: v for k, v in env_of(svc).items() if k.startswith("MTRANK_")}, monkeypatch)
        assert s.workers >= 2, "several uvicorn workers per replica"
        cpus = (((svc.get("deploy") or {}).get("resources") or {}).get("limits") or {}).get("cpus") or svc.get("cpus")
        assert cpus is not None, f"{name}: set a cpus limit to size workers against"
        assert s.ort_intra_op_threads >= 1, f"{name}: set MTRANK_ORT_INTRA_OP_THREADS under a cpus limit"
        assert s.workers * s.ort_intra_op_threads <= float(cpus), \
            f"{name}: {s.workers} workers x {s.ort_intra_op_threads} threads > {cpus} cpus"


def test_stop_grace_period_outlasts_the_drain(compose, monkeypatch):
    for name in service_replicas(compose):
        svc = compose["services"][name]
        s = settings_from({k: v for k, v in env_of(svc).items() if k.startswith("MTRANK_")}, monkeypatch)
        grace = duration_s(svc.get("stop_grace_period", "10s"))
        assert grace >= s.shutdown_drain_s + 2, \
            f"{name}: stop_grace_period {grace}s leaves no margin over MTRANK_SHUTDOWN_DRAIN_S {s.shutdown_drain_s}s"
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM"


# -- security -------------------------------------------------------------------------------------
def test_model_store_is_read_only_and_the_service_is_not_root(compose, dockerfile_stages, monkeypatch):
    uid = re.search(r"useradd [^\n]*--uid (\d+)", dockerfile_stages["base"])[1]
    gid = re.search(r"groupadd [^\n]*--gid (\d+)", dockerfile_stages["base"])[1]
    for name in service_replicas(compose):
        svc = compose["services"][name]
        store = settings_from({k: v for k, v in env_of(svc).items() if k.startswith("MTRANK_")},
                              monkeypatch).model_store
        mounts = [v for v in svc["volumes"] if v.split(":")[1] == store]
        assert mounts and all(v.endswith(":ro") for v in mounts), f"{name} must mount {store} read-only"
        assert str(svc["user"]) == f"{uid}:{gid}" and uid != "0", "the service runs as the image's user"
        assert svc.get("read_only") is True and "/tmp" in svc.get("tmpfs", [])
        assert svc.get("cap_drop") == ["ALL"]
    assert any(v.startswith("models:/models") and not v.endswith(":ro") for v in compose["services"]["job"]["volumes"])


def _interpolated(value: str) -> bool:
    return bool(re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?[-?][^}]*)?\}", value))


def test_no_secret_is_written_in_the_files(compose):
    """Passwords come from ${VARS} (.env); the ones compose needs are required (:?) and listed
    in deploy/env.example, which itself holds no value."""
    raw = compose["services"]
    for name, svc in raw.items():
        env = svc.get("environment") or {}
        for key, value in env.items():
            if "MTRANK_REDIS_URL" == key:
                pw = urlsplit(interpolate(value, {k: "${" + k + "}" for k in TEST_ENV})).password
                assert pw is None or _interpolated(pw), f"{name}: the Redis URL carries a literal password"
            elif re.search(r"PASSWORD|TOKEN|SECRET", key):
                assert _interpolated(str(value)), f"{name}: {key} is written in the file"
    text = (ROOT / "docker-compose.yml").read_text()
    assert "--requirepass \\\"$$REDIS_PASSWORD\\\"" in text
    assert re.search(r"^\s*#.*rediss://:\$\{REDIS_PASSWORD\}@", text, re.M), "a commented TLS example"
    assert re.search(r"^\s*#.*redis\+cluster://", text, re.M), "a commented Redis Cluster example"
    example = {line.split("=", 1)[0]: line.split("=", 1)[1]
               for line in (ROOT / "deploy" / "env.example").read_text().splitlines()
               if line and not line.startswith("#")}
    assert all(v == "" for v in example.values()), "env.example holds no values"
    used = {var for var, _ in interpolation_vars(text)}
    required = {var for var, op in interpolation_vars(text) if op in (":?", "?")}
    assert required == set(TEST_ENV), required
    assert used <= set(example), f"document {sorted(used - set(example))} in deploy/env.example"
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        env_of(raw["service"], {"GRAFANA_ADMIN_PASSWORD": "x"})
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        env_of(raw["service"], {"REDIS_PASSWORD": ""})


def test_dockerignore_keeps_secrets_out_and_the_build_inputs_in(dockerfile_stages):
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        out = False
        for p in patterns:
            neg = p.startswith("!")
            pat = p.lstrip("!").rstrip("/")
            hit = fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or \
                (pat.startswith("**/") and fnmatch.fnmatch(path.rsplit("/", 1)[-1], pat[3:]))
            if hit:
                out = not neg
        return out

    for path in (".env", ".env.local", ".git", ".venv", "model_store", "data", "deploy/env.example"):
        assert ignored(path), f"{path} must not be in the build context"
    sources = re.findall(r"^COPY ((?:\S+ )+)\S+$", "\n".join(dockerfile_stages.values()), re.M)
    for src in " ".join(sources).split():
        assert not ignored(src), f".dockerignore hides {src}, which the Dockerfile copies"


# -- CLI, Dockerfile, README ----------------------------------------------------------------------
def test_compose_job_runs_the_bootstrap_with_settings_it_reads(compose):
    """The job runs training/bootstrap.py (which runs the CLI's own commands; tests/deploy/
    test_bootstrap.py runs it for real); every JOB_* variable compose sets is one it reads, with a
    valid value, and the compose defaults are the bootstrap's own."""
    from training import bootstrap

    job = compose["services"]["job"]
    assert job["entrypoint"] == ["python", "-m", "training.bootstrap"] and "command" not in job
    assert importlib.util.find_spec("training.bootstrap") is not None

    class Recording(dict):
        read: set = set()

        def get(self, key, default=None):
            self.read.add(key)
            return super().get(key, default)

    env = {k: v for k, v in env_of(job).items() if k.startswith("JOB_")}
    rec = Recording(env)
    opts = bootstrap.options(rec)
    assert set(env) <= rec.read, f"the job sets {sorted(set(env) - rec.read)}, which bootstrap.options never reads"
    assert opts == bootstrap.options({}), "compose's defaults are the bootstrap's defaults"
    assert opts.retrain is False


def test_dockerfile_service_stage_has_no_torch_and_is_non_root(dockerfile_stages):
    stages = dockerfile_stages
    assert set(stages) == {"base", "trainer", "gpu", "service"}
    service = stages["service"]
    assert "torch" not in service.replace("'torch' not in sys.modules", "")
    assert "python requirements.py cpu >" in service and "pip install --no-deps '.[cpu]'" in service
    assert "requirements.py train" not in service and "requirements.py gpu" not in service and "'.[gpu]'" not in service
    users = re.findall(r"^USER (\S+)", service, re.M)
    assert users and users[-1] not in ("root", "0", "0:0"), "the service stage ends as a non-root user"
    assert users[-1] == "mtrank"
    assert 'CMD ["mtrank", "serve"]' in service and "EXPOSE 8000" in service
    assert "torch==2.13.0" in stages["trainer"]
    text = (ROOT / "Dockerfile").read_text()
    assert text.rstrip().splitlines()[-1].startswith("CMD"), "service is the last stage: the default target"
    assert re.findall(r"^FROM (\S+) AS service$", text, re.M) == ["base"]


def _arg_defaults(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", text, re.M))


def test_dockerfile_base_images_and_torch_source_are_build_args(dockerfile_stages):
    """Every FROM is a build argument (public default) or an earlier stage; torch comes from the
    PyTorch CPU index by default or from a wheel in the build context; the CA bundle is a build
    secret, never copied."""
    text = (ROOT / "Dockerfile").read_text()
    args = _arg_defaults(text)
    stages = []
    for image, stage in re.findall(r"^FROM (\S+) AS (\w+)$", text, re.M):
        m = re.fullmatch(r"\$\{(\w+)\}", image)
        assert m or image in stages, f"FROM {image}: use a build argument (or an earlier stage)"
        if m:
            assert args.get(m[1]), f"{m[1]} needs a public default"
        stages.append(stage)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    trainer = dockerfile_stages["trainer"]
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert 'pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0' in trainer
    assert "--mount=type=bind,source=deploy/wheels,target=/wheels" in trainer and '"$TORCH_WHEEL"' in trainer
    assert (ROOT / "deploy" / "wheels" / ".gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]
    assert not re.search(r"^(COPY|ADD)\b.*(ca-certificates|\.crt|\.pem)", text, re.M | re.I)
    for run in re.findall(r"^RUN (?:.*\\\n)*.*$", text, re.M):
        if "pip install" in run:
            assert "--mount=type=secret,id=ca" in run and "PIP_CERT=/run/secrets/ca" in run, run


def test_dockerfile_gpu_stage_is_cuda_only_and_strict(dockerfile_stages):
    text = (ROOT / "Dockerfile").read_text()
    gpu = dockerfile_stages["gpu"].split("\n# The CPU service")[0]
    cuda = _arg_defaults(text)["CUDA_IMAGE"]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", cuda), cuda
    assert "FROM ${CUDA_IMAGE} AS gpu" in text
    assert "python requirements.py gpu >" in gpu and "pip install --no-deps '.[gpu]'" in gpu
    assert "cpu" not in gpu.replace("CPU", "") and "train" not in gpu and "torch==" not in gpu
    assert "'onnxruntime-gpu' in names and 'onnxruntime' not in names" in gpu, "the image checks: one onnxruntime"
    env = dict(re.findall(r"\b(MTRANK_\w+)=(\S+)", gpu))
    assert env["MTRANK_PROVIDERS"] == "cuda" and env["MTRANK_PROVIDERS_STRICT"] == "1" and env["MTRANK_WORKERS"] == "1"
    assert re.findall(r"^USER (\S+)", gpu, re.M)[-1] == "mtrank"
    base_uid = re.search(r"useradd [^\n]*--uid (\d+)", dockerfile_stages["base"])[1]
    assert re.search(r"useradd [^\n]*--uid (\d+)", gpu)[1] == base_uid
    assert 'CMD ["mtrank", "serve"]' in gpu


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "mtrank demo" in makefile and "pytest" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_docker_compose_config_accepts_the_file(tmp_path):
    cli = compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI on this machine")
    base = [*cli, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml")]
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in TEST_ENV.items()))
    clean = {k: v for k, v in __import__("os").environ.items() if k not in TEST_ENV}
    r = subprocess.run([*base, "--env-file", str(env_file), "config", "-q"], capture_output=True, text=True,
                       timeout=60, env=clean)
    assert r.returncode == 0, r.stderr
    (tmp_path / "empty").write_text("")
    r = subprocess.run([*base, "--env-file", str(tmp_path / "empty"), "config", "-q"], capture_output=True,
                       text=True, timeout=60, env=clean)
    assert r.returncode != 0 and "REDIS_PASSWORD" in r.stderr, "compose must refuse to run without the password"


def test_docker_compose_config_accepts_the_local_override(tmp_path):
    cli = compose_cli()
    if cli is None:
        pytest.skip("no docker compose CLI on this machine")
    env_file = tmp_path / "env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in TEST_ENV.items()))
    clean = {k: v for k, v in __import__("os").environ.items() if k not in TEST_ENV}
    r = subprocess.run([*cli, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"),
                        "-f", str(ROOT / "docker-compose.local.yml"), "--env-file", str(env_file), "config"],
                       capture_output=True, text=True, timeout=60, env=clean)
    assert r.returncode == 0, r.stderr
    merged = __import__("yaml").safe_load(r.stdout)["services"]
    assert all(svc["image"].startswith("mtrank-local/") for svc in merged.values()), \
        {n: svc.get("image") for n, svc in merged.items()}


def test_the_local_override_replaces_every_image_with_a_stand_in(compose):
    """Each service of docker-compose.yml gets an image the script builds (deploy/local-images.sh),
    and each build gets the stand-in Python base; the public images stay the defaults."""
    import yaml

    local = yaml.safe_load((ROOT / "docker-compose.local.yml").read_text())["services"]
    assert set(local) == set(compose["services"])
    script = (ROOT / "deploy" / "local-images.sh").read_text()
    built = {f"mtrank-local/{t}" for t in re.findall(r"^build (\S+) ", script, re.M)}
    built |= {f"mtrank-local/mtrank:{t}" for t in re.findall(r'-t "\$PREFIX/mtrank:(\w+)"', script)}
    assert built >= {"mtrank-local/python:3.11", "mtrank-local/redis:7", "mtrank-local/nginx:1.22",
                     "mtrank-local/prometheus:2", "mtrank-local/mtrank:service", "mtrank-local/mtrank:trainer"}
    for name, svc in compose["services"].items():
        over = local[name]
        assert over["image"] in built, f"{name}: {over['image']} is not built by deploy/local-images.sh"
        if "build" in svc:
            assert svc["build"]["args"]["PYTHON_IMAGE"] == "python:3.11-slim"
            assert over["build"]["args"]["PYTHON_IMAGE"] == "mtrank-local/python:3.11"
            target = svc["build"]["target"]
            assert over["image"] == f"mtrank-local/mtrank:{target}"
        else:
            assert "/" not in svc["image"].split(":")[0] or svc["image"].split("/")[0] in ("prom", "grafana"), \
                f"{name}: the default stays the public image ({svc['image']})"
    assert "grafana" in local and "placeholder" in (ROOT / "docker-compose.local.yml").read_text()


def test_requirements_lister_is_pyproject(tmp_path):
    """deploy/requirements.py (the Dockerfile's dependency layer) lists exactly pyproject.toml's
    dependencies and the named extras'; an unknown extra is skipped with a message, as pip does."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    script = ROOT / "deploy" / "requirements.py"
    for extras in ([], ["train"], ["gpu"]):
        r = subprocess.run([sys.executable, str(script), *extras], capture_output=True, text=True, check=True,
                           cwd=tmp_path)
        want = project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]
        assert r.stdout.splitlines() == want
    r = subprocess.run([sys.executable, str(script), "no-such-extra"], capture_output=True, text=True, check=True)
    assert r.stdout.splitlines() == project["dependencies"] and "no-such-extra" in r.stderr
