"""Packaging and self-description: the wheel, the single file alone, one
version, and an OpenAPI document that matches the router."""

import http
import os
import re
import shutil
import subprocess
import sys
import urllib.request

import pytest

import agent_relay
from conftest import ROOT, SpawnedRelay


def test_every_routed_path_is_documented_and_every_documented_path_is_routed():
    document = agent_relay.OPENAPI_DOCUMENT
    routed = {(route.method.lower(), agent_relay.re.sub(r"\{(\w+)(:int)?\}", r"{\1}", route.pattern))
              for route in agent_relay.ROUTER.routes}
    documented = {(method, path) for path, operations in document["paths"].items() for method in operations}
    assert routed == documented
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation["summary"] and operation["responses"], (method, path)
            sample = agent_relay.re.sub(r"\{\w+\}", "1", path)
            route, _ = agent_relay.ROUTER.resolve(method.upper(), sample)
            assert route.handler == operation["operationId"]


def test_the_document_is_valid_openapi_3_1(relay):
    validator = pytest.importorskip("openapi_spec_validator")
    r = relay.call("GET", "/api/openapi.json")
    assert r.status == 200 and r.json["openapi"] == "3.1.0"
    assert r.json["info"]["version"] == agent_relay.__version__
    validator.validate(r.json)


def test_one_version_everywhere(relay):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "agent_relay.py"), "--version"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "agent-relay " + agent_relay.__version__
    assert relay.call("GET", "/api/stats").json["version"] == agent_relay.__version__
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as f:
        assert "## %s" % agent_relay.__version__ in f.read()


def test_the_single_file_works_alone(tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(os.path.join(ROOT, "agent_relay.py"), str(alone / "agent_relay.py"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_RELAY_")}
    env["PYTHONPATH"] = ""
    proc = subprocess.Popen([sys.executable, str(alone / "agent_relay.py"), "--port", "0"], cwd=str(alone), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.split(" listening on ")[1].split()[0]
        with urllib.request.urlopen(url + "/api/health", timeout=10) as answer:
            assert b'"ok"' in answer.read()
        with urllib.request.urlopen(url + "/", timeout=10) as answer:
            page = answer.read().decode()
        assert "dashboard.html" in page and "was not found" in page
        assert (alone / "agent-relay.db").exists()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        proc.stdout.close()
        proc.stderr.close()


def _venv(tmp_path, name):
    folder = tmp_path / name
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    return folder, str(folder / "bin" / "python")


@pytest.mark.slow
def test_the_wheel_installs_the_command_the_module_and_the_dashboard(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), ROOT],
                           capture_output=True, text=True)
    if build.returncode != 0 and "Could not" in build.stderr and "setuptools" in build.stderr:
        pytest.skip("no package index to fetch the build backend from")
    assert build.returncode == 0, build.stderr
    wheels = list(dist.glob("agent_relay-%s-*.whl" % agent_relay.__version__))
    assert len(wheels) == 1, list(dist.iterdir())
    venv, python = _venv(tmp_path, "venv")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", str(wheels[0])], check=True)
    command = str(venv / "bin" / "agent-relay")
    assert subprocess.run([command, "--version"], capture_output=True, text=True,
                          check=True).stdout.strip() == "agent-relay " + agent_relay.__version__
    workdir = tmp_path / "run"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_RELAY_", "PYTHON"))}
    relay = SpawnedRelay.__new__(SpawnedRelay)
    relay.proc = subprocess.Popen([command, "--port", "0"], cwd=str(workdir), env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    try:
        url = relay.proc.stdout.readline().split(" listening on ")[1].split()[0]
        with urllib.request.urlopen(url + "/", timeout=10) as answer:
            page = answer.read().decode()
        assert "was not found" not in page and "Agent Relay" in page
        installed = subprocess.run([python, "-c", "import agent_relay; print(agent_relay.__file__)"],
                                   capture_output=True, text=True, check=True, cwd=str(workdir)).stdout
        assert str(venv) in installed
    finally:
        relay.stop()


@pytest.mark.slow
def test_pipx_runs_the_project(tmp_path):
    if subprocess.run([sys.executable, "-m", "pipx", "--version"], capture_output=True).returncode != 0:
        pytest.skip("pipx is not installed (.ci/run installs it)")
    env = dict(os.environ, PIPX_HOME=str(tmp_path / "pipx"), PIPX_BIN_DIR=str(tmp_path / "bin"))
    done = subprocess.run([sys.executable, "-m", "pipx", "run", "--spec", ROOT, "agent-relay", "--help"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "register this session as an agent" in done.stdout


def _raised_error_codes():
    """(code, status or None, line) for every error code agent_relay.py raises or answers."""
    import ast
    with open(os.path.join(ROOT, "agent_relay.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    code_position = {"RelayError": 1, "bad_request": 2, "not_found": 0, "conflict": 0, "forbidden": 0}
    helper_status = {"bad_request": 400, "not_found": 404, "conflict": 409, "forbidden": 403}

    def constant(node):
        return node.value if isinstance(node, ast.Constant) else None
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if key is not None and constant(key) == "code" and isinstance(constant(value), str):
                    found.append((constant(value), None, node.lineno))
        if not isinstance(node, ast.Call):
            continue
        name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
        if name == "send_error" and node.args and isinstance(constant(node.args[0]), int):
            status = constant(node.args[0])
            word = re.sub(r"[^a-z0-9]+", "_", http.HTTPStatus(status).phrase.lower()).strip("_")
            found.append((word, status, node.lineno))
        if name not in code_position:
            continue
        keyword = [k.value for k in node.keywords if k.arg == "code"]
        position = code_position[name]
        code = keyword[0] if keyword else node.args[position] if len(node.args) > position else None
        if code is None and name == "bad_request":
            found.append(("invalid_field", 400, node.lineno))
        elif isinstance(constant(code), str):
            status = constant(node.args[0]) if name == "RelayError" else helper_status[name]
            found.append((constant(code), status, node.lineno))
    return found


def test_every_error_code_raised_is_in_the_catalogue_with_its_status():
    found = _raised_error_codes()
    assert len(found) > 80
    catalogue = agent_relay.ERROR_CODES
    for code, status, line in found:
        if status == 0:
            assert code in agent_relay.CLIENT_ERROR_CODES or code in catalogue, (code, line)
            continue
        assert code in catalogue, "line %d raises %r, which ERROR_CODES does not declare" % (line, code)
        assert status is None or catalogue[code].status == status, (code, status, line)
    assert all(entry.meaning and 100 <= entry.status < 600 for entry in catalogue.values())


def test_the_error_catalogue_is_the_openapi_error_code_enum():
    schema = agent_relay.OPENAPI_DOCUMENT["components"]["schemas"]["Error"]["properties"]["code"]
    assert schema["enum"] == sorted(agent_relay.ERROR_CODES)


@pytest.mark.slow
def test_schemathesis_with_every_check_finds_nothing(spawn_relay, tmp_path):
    """The real schemathesis CLI, every check (server errors, schema-valid
    requests refused, schema-breaking ones accepted, answers outside the
    schema, Allow and undeclared methods, SSE events...), a bounded number of
    examples, against a live relay (the backup route too: it writes only
    inside BACKUP_DIR, here beside the temporary database).
    tests/schemathesis.toml lists the rejections that depend on state or on
    two query parameters together."""
    command = shutil.which("schemathesis")
    if command is None:
        pytest.skip("schemathesis is not installed (.ci/run installs it)")
    relay = spawn_relay(cwd=str(tmp_path))
    examples = os.environ.get("SCHEMATHESIS_EXAMPLES", "10")
    done = subprocess.run([command, "--config-file", os.path.join(ROOT, "tests", "schemathesis.toml"), "run",
                           relay.url + "/api/openapi.json", "--checks", "all", "--max-examples", examples,
                           "--seed", "22", "--generation-database", "none", "--no-color"],
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-8000:] + done.stderr[-2000:]
    assert relay.stop() == 0


def test_the_document_states_the_limits_the_server_enforces():
    paths = agent_relay.OPENAPI_DOCUMENT["paths"]

    def body(path, method="post"):
        return paths[path][method]["requestBody"]["content"]["application/json"]["schema"]
    lease = body("/api/tasks/{id}/claim")["properties"]["leaseSeconds"]["anyOf"][0]
    assert (lease["minimum"], lease["maximum"]) == (1, 7 * 86400)
    agent_id = body("/api/pairs/{id}/accept")["properties"]["agentId"]
    assert agent_id["pattern"] == agent_relay.AGENT_ID_RE.pattern and agent_id["maxLength"] == 200
    statuses = [p for p in paths["/api/tasks"]["get"]["parameters"] if p["name"] == "status"][0]["schema"]["enum"]
    assert set(statuses) == set(agent_relay.TASK_STATUSES) | {"active", ""}
    text = body("/api/pairs")["properties"]["objective"]["anyOf"][0]
    assert (text["minLength"], text["maxLength"]) == (1, 2000)
    assert text["pattern"] == "[^%s]" % agent_relay.WHITESPACE_CLASS  # something besides whitespace


def test_the_whitespace_class_of_the_document_is_pythons():
    spelled = re.compile("[%s]" % agent_relay.WHITESPACE_CLASS)
    assert [c for c in range(0x110000) if spelled.fullmatch(chr(c))] == [
        c for c in range(0x110000) if chr(c).isspace()]
    assert not agent_relay.valid_agent_id("agent\n") and agent_relay.valid_agent_id("agent")
