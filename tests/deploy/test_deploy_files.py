"""Docker files: no Docker engine runs here, so check what can be checked without one: the
compose file parses, wires Redis -> job -> service with health checks, runs commands the CLI
really has, and the service image installs no torch and runs as a non-root user."""

import re
import shlex
from pathlib import Path

import yaml
from typer.testing import CliRunner

from service.cli import app

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_wires_redis_job_and_service():
    c = compose()["services"]
    assert set(c) >= {"redis", "job", "service"}
    svc = c["service"]
    assert svc["ports"] == ["8000:8000"]
    assert svc["environment"]["MTRANK_PORT"] == "8000" and svc["environment"]["MTRANK_HOST"] == "0.0.0.0"
    assert svc["depends_on"]["job"]["condition"] == "service_completed_successfully"
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(svc["healthcheck"]["test"]) and "healthcheck" in c["redis"]
    assert any(v.endswith(":ro") for v in svc["volumes"]), "the service reads the model store read-only"
    for name in ("job", "service"):
        env = c[name]["environment"]
        assert env["MTRANK_REDIS_URL"].startswith("redis://redis:6379")
        assert env["MTRANK_MODEL_NAME"] == "demo"
    assert c["service"]["build"]["target"] == "service" and c["job"]["build"]["target"] == "trainer"


def test_compose_job_runs_real_cli_commands():
    script = compose()["services"]["job"]["command"][0]
    steps = [shlex.split(s) for s in script.split("&&")]
    assert [s[:2] for s in steps] == [["mtrank", "synth"], ["mtrank", "train"], ["mtrank", "features"]]
    runner = CliRunner()
    for argv in steps:
        sub = argv[1:3] if argv[1] == "features" else argv[1:2]
        r = runner.invoke(app, [*sub, "--help"])
        assert r.exit_code == 0, r.output
        for opt in [a for a in argv if a.startswith("--")]:
            assert opt in r.output, f"{' '.join(sub)} has no option {opt}"


def test_dockerfile_service_stage_has_no_torch_and_is_non_root():
    text = (ROOT / "Dockerfile").read_text()
    stages = dict(re.findall(r"FROM \S+ AS (\w+)\n(.*?)(?=\nFROM |\Z)", text, flags=re.S))
    assert set(stages) == {"base", "trainer", "service"}
    service = stages["service"]
    assert "torch" not in service.replace("'torch' not in sys.modules", "")
    assert "pip install ." in service and "USER mtrank" in service
    assert 'CMD ["mtrank", "serve"]' in service and "EXPOSE 8000" in service
    assert "GPU" in service and ".[gpu]" in service
    assert "torch==2.13.0" in stages["trainer"]


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "mtrank demo" in makefile and "pytest" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
