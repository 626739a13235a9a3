"""The deployment files under deploy/, checked without a server: Prefect's own loader of
prefect.yaml accepts them, every entrypoint imports its flow, every deployment's parameters (and
each schedule's) validate against the flow signature, the build/pull steps resolve, and the
Dockerfile, the Kubernetes manifests and the Slurm example agree with them and with each other."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PREFECT_FILES = {
    "process": DEPLOY / "prefect.yaml",
    "kubernetes": DEPLOY / "kubernetes" / "prefect.yaml",
}
EXPECTED = {
    "process": {
        "nightly-refit": ("flows/fit.py:kmeans_fit", "kmeans-fit"),
        "hourly-labels": ("flows/predict.py:kmeans_predict", "kmeans-predict"),
    },
    "kubernetes": {
        "nightly-refit-k8s": ("flows/fit.py:kmeans_fit", "kmeans-fit"),
        "hourly-labels-k8s": ("flows/predict.py:kmeans_predict", "kmeans-predict"),
    },
}
REQUIRED = {"kmeans-fit": {"input", "output", "k"}, "kmeans-predict": {"model", "input", "output"}}
DASK_API = "kubernetes.dask.org/v1"


def load_prefect_file(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Load as `prefect deploy --prefect-file` does; also return what its console printed."""
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from rich.console import Console

    out = io.StringIO()
    configs, actions = _load_deploy_configs_and_actions(path, console=Console(file=out, width=200))
    return configs, actions, out.getvalue()


def prepared(config: dict[str, Any]) -> dict[str, Any]:
    """The config after Prefect's own defaulting and schedule normalisation, as deploy runs it."""
    from prefect.cli.deploy._config import (
        _handle_deprecated_schedule_fields,
        _merge_with_default_deploy_config,
    )

    return _handle_deprecated_schedule_fields(_merge_with_default_deploy_config(config))


@pytest.fixture
def at_root(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Entrypoints are relative to the project root, where `prefect deploy` runs."""
    monkeypatch.chdir(ROOT)
    return ROOT


# --------------------------------------------------------------------------------------------
# prefect.yaml files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(PREFECT_FILES))
def test_prefect_file_loads_without_complaint(variant: str) -> None:
    configs, actions, printed = load_prefect_file(PREFECT_FILES[variant])
    assert printed == "", f"Prefect's loader complained about {PREFECT_FILES[variant]}:\n{printed}"
    names = {config["name"]: config["entrypoint"] for config in configs}
    assert names == {name: entry for name, (entry, _) in EXPECTED[variant].items()}
    assert actions["pull"], "a pull step is needed: the worker must find the entrypoints"


@pytest.mark.parametrize("variant", sorted(PREFECT_FILES))
def test_entrypoints_import_the_flows_and_parameters_validate(variant: str, at_root: Path) -> None:
    from prefect.flows import load_flow_from_entrypoint

    configs, _, _ = load_prefect_file(PREFECT_FILES[variant])
    for config in map(prepared, configs):
        _, flow_name = EXPECTED[variant][config["name"]]
        flow = load_flow_from_entrypoint(config["entrypoint"])
        assert flow.name == flow_name
        parameters = config["parameters"]
        # Complete: schedules create runs from the deployment's parameters alone.
        assert REQUIRED[flow_name] <= set(parameters), config["name"]
        validated = flow.validate_parameters(parameters)  # raises on any bad or unknown value
        assert validated["cluster"].kind == parameters["cluster"]["kind"]
        if flow_name == "kmeans-fit":
            assert validated["k"] >= 1
        for schedule in config["schedules"]:
            flow.validate_parameters({**parameters, **schedule.get("parameters", {})})


@pytest.mark.parametrize("variant", sorted(PREFECT_FILES))
def test_schedules_are_example_crons_inactive_by_default(variant: str) -> None:
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.schedules import CronSchedule

    configs, _, _ = load_prefect_file(PREFECT_FILES[variant])
    crons = {}
    for config in map(prepared, configs):
        (schedule,) = config["schedules"]
        converted = _schedule_config_to_deployment_schedule(schedule)
        assert isinstance(converted["schedule"], CronSchedule)
        assert converted["active"] is False
        crons[config["entrypoint"]] = converted["schedule"].cron
    assert crons["flows/fit.py:kmeans_fit"] == "0 2 * * *"  # nightly re-fit
    assert re.fullmatch(r"\d+ \* \* \* \*", crons["flows/predict.py:kmeans_predict"])  # hourly


def test_process_variant_pool_and_pull_to_the_project_directory(at_root: Path) -> None:
    """The build step records where `prefect deploy` ran; the pull step goes back there.

    The step function is Prefect's own, called directly (`run_steps` would also resolve
    variables and blocks through an API, which this test has no need of).
    """
    from prefect.utilities.importtools import import_object
    from prefect.utilities.templating import apply_values

    configs, actions, _ = load_prefect_file(PREFECT_FILES["process"])
    assert {config["work_pool"]["name"] for config in configs} == {"kmeans-gd-process"}
    outputs = {}
    for step in actions["build"]:
        ((fqn, inputs),) = step.items()
        inputs = dict(inputs)
        step_id = inputs.pop("id")
        outputs[step_id] = asyncio.run(import_object(fqn)(**inputs))
    pull = apply_values(actions["pull"], outputs)
    assert pull == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]


def test_kubernetes_variant_image_pull_and_cluster_agree_with_the_manifests() -> None:
    configs, actions, _ = load_prefect_file(PREFECT_FILES["kubernetes"])
    (build,) = actions["build"]
    step = build["prefect_docker.deployments.steps.build_docker_image"]
    assert step["dockerfile"] == "deploy/Dockerfile" and step["id"] == "build-image"
    image = f"{step['image_name']}:{step['tag']}"
    (pull,) = actions["pull"]
    workdir = pull["prefect.deployments.steps.set_working_directory"]["directory"]
    assert workdir == dockerfile_instructions("WORKDIR")[-1]

    docs = kubernetes_documents()
    (dask_cluster,) = [doc for doc in docs if doc["kind"] == "DaskCluster"]
    namespace = dask_cluster["metadata"]["namespace"]
    address = (
        f"tcp://{dask_cluster['metadata']['name']}-scheduler.{namespace}.svc.cluster.local:8786"
    )
    (worker,) = [doc for doc in docs if doc["kind"] == "Deployment"]
    pool = worker_option(worker, "--pool")
    flow_accounts = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "ServiceAccount"}
    for config in configs:
        job = config["work_pool"]["job_variables"]
        assert config["work_pool"]["name"] == pool
        assert job["image"] == "{{ build-image.image }}"
        assert job["namespace"] == namespace
        assert job["service_account_name"] in flow_accounts
        assert config["parameters"]["cluster"] == {"kind": "scheduler", "address": address}
    for pod in (dask_cluster["spec"]["worker"]["spec"], dask_cluster["spec"]["scheduler"]["spec"]):
        assert {container["image"] for container in pod["containers"]} == {image}
    assert {c["image"] for c in worker["spec"]["template"]["spec"]["containers"]} == {image}


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


def dockerfile_instructions(name: str) -> list[str]:
    """Arguments of every ``name`` instruction, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        " ".join(match.group(1).split())
        for match in re.finditer(rf"^{name}\s+(.*)$", joined, flags=re.MULTILINE)
    ]


def copy_sources(copy: str) -> list[str]:
    """The project paths a COPY instruction copies (its sources may be wildcards, as Docker's)."""
    *sources, _ = copy.split()
    found = []
    for source in sources:
        matches = sorted(ROOT.glob(source)) if any(c in source for c in "*?[") else [ROOT / source]
        found.extend(str(path.relative_to(ROOT)) for path in matches if path.exists())
    return found


def test_dockerfile_installs_the_project_as_a_non_root_user() -> None:
    assert dockerfile_instructions("FROM") == ["python:3.11-slim"]
    assert any(re.search(r"\bpip install \.(\s|$)", run) for run in dockerfile_instructions("RUN"))
    for copy in dockerfile_instructions("COPY"):
        assert copy_sources(copy), f"COPY {copy}: nothing in the project"
    assert "pyproject.toml" in copy_sources(dockerfile_instructions("COPY")[0])
    (user,) = dockerfile_instructions("USER")
    assert user not in ("root", "0") and not user.startswith("0:")
    entrypoint = json.loads(dockerfile_instructions("ENTRYPOINT")[0])
    # An exec-form init that runs whatever command the work pool or the Dask operator gives.
    assert entrypoint[0].endswith("tini") and entrypoint[-1] == "--"


def test_dockerfile_build_context_builds_a_wheel(tmp_path: Path) -> None:
    """What the Dockerfile copies is enough for `pip install .` (checked as a wheel build, with
    pip's build isolation as in the image: the build backend comes from PyPI)."""
    context = tmp_path / "context"
    context.mkdir()
    for copy in dockerfile_instructions("COPY"):
        for source in copy_sources(copy):
            src = ROOT / source
            if src.is_dir():
                shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, context / source)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
         "--wheel-dir", str(tmp_path / "wheels"), "."],
        cwd=context, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = (tmp_path / "wheels").glob("kmeans_gd-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "flows/fit.py" in names and "flows/serve.py" in names and "pipeline/kernel.py" in names


# --------------------------------------------------------------------------------------------
# Kubernetes manifests
# --------------------------------------------------------------------------------------------


def kubernetes_documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        if path.name == "prefect.yaml":
            continue
        docs.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def worker_option(deployment: dict[str, Any], option: str) -> str:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    argv = [*container.get("command", []), *container.get("args", [])]
    return argv[argv.index(option) + 1]


def test_kubernetes_manifests_parse_with_the_expected_kinds() -> None:
    docs = kubernetes_documents()
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(doc), doc
    kinds = {(doc["apiVersion"], doc["kind"]) for doc in docs}
    assert (DASK_API, "DaskCluster") in kinds
    assert (DASK_API, "DaskAutoscaler") in kinds
    assert ("apps/v1", "Deployment") in kinds
    namespaces = {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"}
    (namespace,) = [doc["metadata"]["name"] for doc in docs if doc["kind"] == "Namespace"]
    assert namespaces == {namespace}


def test_dask_cluster_spec_is_consistent() -> None:
    docs = kubernetes_documents()
    (cluster,) = [doc for doc in docs if doc["kind"] == "DaskCluster"]
    (autoscaler,) = [doc for doc in docs if doc["kind"] == "DaskAutoscaler"]
    name = cluster["metadata"]["name"]
    assert autoscaler["spec"]["cluster"] == name
    assert 0 <= autoscaler["spec"]["minimum"] <= autoscaler["spec"]["maximum"]
    spec = cluster["spec"]
    (worker,) = spec["worker"]["spec"]["containers"]
    (scheduler,) = spec["scheduler"]["spec"]["containers"]
    # The image has only the `dask` command (no dask-worker / dask-scheduler scripts).
    assert worker["args"][:2] == ["dask", "worker"]
    assert scheduler["args"][:2] == ["dask", "scheduler"]
    ports = {port["name"]: port["containerPort"] for port in scheduler["ports"]}
    assert ports == {"tcp-comm": 8786, "http-dashboard": 8787}
    service = spec["scheduler"]["service"]
    assert service["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    assert {port["targetPort"] for port in service["ports"]} == set(ports)
    claims = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "PersistentVolumeClaim"}
    for volume in spec["worker"]["spec"].get("volumes", []):
        assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_prefect_worker_deployment_and_rbac() -> None:
    docs = kubernetes_documents()
    (deployment,) = [doc for doc in docs if doc["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    argv = [*container.get("command", []), *container.get("args", [])]
    assert argv[:3] == ["prefect", "worker", "start"]
    assert worker_option(deployment, "--type") == "kubernetes"
    assert {env["name"] for env in container["env"]} >= {"PREFECT_API_URL"}
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = [doc for doc in docs if doc["kind"] == "RoleBinding"]
    (binding,) = [b for b in bindings if b["subjects"][0]["name"] == account]
    (role,) = [
        doc
        for doc in docs
        if doc["kind"] == "Role" and doc["metadata"]["name"] == binding["roleRef"]["name"]
    ]
    job_rules = [rule for rule in role["rules"] if "jobs" in rule["resources"]]
    assert job_rules and {"create", "delete", "watch"} <= set(job_rules[0]["verbs"])
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


# --------------------------------------------------------------------------------------------
# Slurm example
# --------------------------------------------------------------------------------------------


def test_slurm_batch_script_runs_the_cli_against_its_scheduler() -> None:
    script = DEPLOY / "slurm" / "kmeans-fit.sbatch"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert re.search(r"^#SBATCH --nodes=\d+", text, flags=re.MULTILINE)
    assert "dask scheduler --scheduler-file" in text
    assert re.search(r"srun .*\\\n\s*dask worker --scheduler-file", text)
    assert re.search(r'kmeans-gd fit "\$input" "\$output" -k "\$k" --scheduler "\$address"', text)
    bash = shutil.which("bash")
    if bash:
        subprocess.run([bash, "-n", str(script)], check=True)


def test_slurm_cli_options_exist() -> None:
    """The options the batch script gives `kmeans-gd fit` are the CLI's."""
    from flows.cli import _parser

    args = _parser().parse_args(["fit", "in", "out", "-k", "8", "--scheduler", "tcp://node:8786"])
    assert args.scheduler == "tcp://node:8786" and args.k == 8


def test_slurm_cluster_parameter_validates_and_matches_jobqueue_config() -> None:
    from flows.fit import kmeans_fit

    cluster = json.loads((DEPLOY / "slurm" / "slurm-cluster.json").read_text())
    validated = kmeans_fit.validate_parameters(
        {"input": "in", "output": "out", "k": 8, "cluster": cluster}
    )
    choice = validated["cluster"]
    assert choice.kind == "class" and choice.cluster_class == "dask_jobqueue.SLURMCluster"
    assert choice.adapt_minimum <= choice.adapt_maximum

    config = yaml.safe_load((DEPLOY / "slurm" / "jobqueue.yaml").read_text())
    slurm = config["jobqueue"]["slurm"]
    # Every kwarg is a SLURMCluster option, i.e. a jobqueue.slurm key (dashes for underscores).
    known = set(slurm) | {"queue", "account", "memory", "cores", "processes", "walltime"}
    for key in choice.kwargs:
        assert key.replace("_", "-") in known, f"{key} is not a jobqueue.slurm option"
    try:
        import dask_jobqueue
    except ImportError:
        return
    import inspect

    accepted = (
        set(inspect.signature(dask_jobqueue.SLURMCluster.__init__).parameters)
        | set(inspect.signature(dask_jobqueue.slurm.SLURMJob.__init__).parameters)
        | set(inspect.signature(dask_jobqueue.core.Job.__init__).parameters)
    )
    assert set(choice.kwargs) <= accepted


# --------------------------------------------------------------------------------------------
# flows/serve.py: everything is checked before anything is registered
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "phrase"),
    [
        ({"cron_fit": "every night"}, "cron_fit='every night' is not a valid cron string"),
        (
            {"fit_parameters": {"k": 0}},
            "fit_parameters: invalid parameters: k: Input should be greater than or equal to 1",
        ),
        ({"fit_parameters": {"kk": 3}}, "unknown parameter(s) kk for flow 'kmeans-fit'"),
        (
            {"fit_parameters": {"cluster": {"kind": "nowhere"}}},
            "fit_parameters: invalid parameters: cluster",
        ),
        (
            {"predict_parameters": {"overwrite": "perhaps"}},
            "predict_parameters: invalid parameters: overwrite",
        ),
        (
            {"cron_fit": "0 2 * * *", "fit_parameters": {"k": 8}},
            "a schedule needs every required parameter; missing input, output",
        ),
        ({"cron_predict": "5 * * * *"}, "missing model, input, output"),
        ({"limit": 0}, "limit=0 should be a positive integer"),
    ],
)
def test_serve_refuses_bad_arguments(arguments: dict[str, Any], phrase: str) -> None:
    from flows.serve import ServeError, serve

    with pytest.raises(ServeError) as refused:
        serve(**arguments)
    assert phrase in str(refused.value)


def test_serve_builds_both_deployments_with_module_entrypoints() -> None:
    from prefect.client.schemas.schedules import CronSchedule

    from flows.serve import SERVED_DEPLOYMENT, build_deployments

    fit_parameters = {
        "input": "/data/points",
        "output": "/data/model",
        "k": 8,
        "cluster": {"kind": "local", "workers": 2},
    }
    fit, predict = build_deployments(cron_fit="0 2 * * *", fit_parameters=fit_parameters)
    assert (fit.flow_name, fit.name) == ("kmeans-fit", SERVED_DEPLOYMENT)
    assert (predict.flow_name, predict.name) == ("kmeans-predict", SERVED_DEPLOYMENT)
    # Module paths: runs import the installed package whatever the serving directory.
    assert fit.entrypoint == "flows.fit.kmeans_fit"
    assert predict.entrypoint == "flows.predict.kmeans_predict"
    assert fit.parameters == fit_parameters and predict.parameters == {}
    assert fit.enforce_parameter_schema and predict.enforce_parameter_schema
    (schedule,) = fit.schedules
    assert isinstance(schedule.schedule, CronSchedule) and schedule.schedule.cron == "0 2 * * *"
    assert predict.schedules == []
    # Names distinct from deploy/prefect.yaml's: serving never replaces a work-pool deployment.
    configs, _, _ = load_prefect_file(PREFECT_FILES["process"])
    assert SERVED_DEPLOYMENT not in {config["name"] for config in configs}


def test_serve_needs_a_prefect_api() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.serve import ServeError, serve

    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        pytest.raises(ServeError, match="no Prefect API configured"),
    ):
        serve(fit_parameters={"k": 2})


def test_serve_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m flows.serve` (and `kmeans-gd serve`): JSON and NAME=VALUE parameters; a bad
    argument is one line on stderr and exit code 2."""
    import argparse

    from flows.serve import add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([
        "--cron-fit", "0 2 * * *", "--fit-params", '{"input": "/data/points", "k": 4}',
        "--fit-param", "k=8", "--fit-param", "output=/data/model",
        "--fit-param", 'cluster={"kind": "scheduler", "address": "tcp://dask:8786"}',
        "--predict-param", "overwrite=true", "--limit", "3",
    ])  # fmt: skip
    assert {**args.fit_params, **dict(args.fit_param)} == {
        "input": "/data/points", "k": 8, "output": "/data/model",
        "cluster": {"kind": "scheduler", "address": "tcp://dask:8786"},
    }  # fmt: skip
    assert dict(args.predict_param) == {"overwrite": True} and args.limit == 3

    assert main(["--cron-fit", "0 2 * * *", "--fit-param", "k=0"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("kmeans-gd: error: fit_parameters: invalid parameters: k:")
        and err.count("\n") == 1
    )


def test_external_workers_never_spill_like_the_embedded_ones() -> None:
    """Every way deploy/ starts Dask workers sets the embedded cluster's memory settings, as the
    environment variables Dask reads its configuration from."""
    from pipeline.cluster import _WORKER_MEMORY_CONFIG

    expected = {
        "DASK_" + key.upper().replace(".", "__"): str(value)
        for key, value in _WORKER_MEMORY_CONFIG.items()
    }
    (cluster,) = [doc for doc in kubernetes_documents() if doc["kind"] == "DaskCluster"]
    (worker,) = cluster["spec"]["worker"]["spec"]["containers"]
    assert {env["name"]: env["value"] for env in worker["env"]}.items() >= expected.items()

    exports = " ".join(f"{name}={value}" for name, value in expected.items())
    assert f"export {exports}" in (DEPLOY / "slurm" / "kmeans-fit.sbatch").read_text()
    slurm = yaml.safe_load((DEPLOY / "slurm" / "jobqueue.yaml").read_text())["jobqueue"]["slurm"]
    assert f"export {exports}" in slurm["job-script-prologue"]
    cluster_json = json.loads((DEPLOY / "slurm" / "slurm-cluster.json").read_text())
    assert f"export {exports}" in cluster_json["kwargs"]["job_script_prologue"]

    import functools

    import dask.config

    # the variables really give Dask the embedded settings
    parsed = dask.config.collect_env(expected)
    for key, value in _WORKER_MEMORY_CONFIG.items():
        assert functools.reduce(dict.__getitem__, key.split("."), parsed) == value, key


def test_every_deployed_worker_has_its_nanny_compile_the_kernel() -> None:
    """Every way deploy/ starts Dask workers runs pipeline.preload in the nanny (the worker then
    loads the kernel from numba's cache instead of compiling it: tests/test_cluster.py)."""
    flag = ["--preload-nanny", "pipeline.preload"]
    (cluster,) = [doc for doc in kubernetes_documents() if doc["kind"] == "DaskCluster"]
    (worker,) = cluster["spec"]["worker"]["spec"]["containers"]
    args = worker["args"]
    assert args[args.index(flag[0]) : args.index(flag[0]) + 2] == flag
    assert " ".join(flag) in (DEPLOY / "slurm" / "kmeans-fit.sbatch").read_text()
    slurm = yaml.safe_load((DEPLOY / "slurm" / "jobqueue.yaml").read_text())["jobqueue"]["slurm"]
    assert slurm["worker-extra-args"] == flag
    cluster_json = json.loads((DEPLOY / "slurm" / "slurm-cluster.json").read_text())
    assert cluster_json["kwargs"]["worker_extra_args"] == flag
    import importlib

    assert callable(importlib.import_module("pipeline.preload").dask_setup)
