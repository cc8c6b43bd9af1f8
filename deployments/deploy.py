"""The parent flow's deployments as code: work pools, one concurrency limit per GPU, deployments.

    python -m deployments.deploy                 # on the server PREFECT_API_URL names
    python -m deployments.deploy --dry-run       # print what it would create, as JSON; no server needed

Idempotent: pools, limits and deployments are created or updated in place. ``specs()`` is the one
place that holds the shared defaults and what each deployment changes; ``apply()`` sends a ``Site``'s
specs to the server. Nothing here runs the pipeline or imports Olive.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from oliveflow.errors import InputError
from oliveflow.overrides import add_params, one_line
from oliveflow.settings import Settings, current, load

FLOW_NAME = "oliveflow-pipeline"
REPO_ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/pipeline.py:pipeline"
GPU_LIMIT_ENV = "OLIVEFLOW_GPU_LIMIT"  # read by flows/pipeline.py: the global concurrency limit to hold
RESULT_BLOCK_NAME = "oliveflow-results"
AZURE_PROTOCOLS = ("az", "abfs")


@dataclass(frozen=True)
class Site:
    """Where and how the pipeline runs: one value of this per installation (local, a GPU host, a team)."""

    gpu_pool: str = "oliveflow-gpu"
    cpu_pool: str | None = "oliveflow-cpu"  # None: no CPU pool and no `cpu` deployment
    gpus: tuple[str, ...] = ("0",)  # CUDA device indices (per host)
    # No hosts (one GPU host): one deployment per GPU, pinned through job variables, limits <prefix>-<i>.
    # Several hosts: one unpinned `gpu` deployment; each worker is bound to one GPU by its own environment,
    # limits <prefix>-<host>-<i> (see worker_commands).
    hosts: tuple[str, ...] = ()
    limit_prefix: str = "gpu"
    source: str = str(REPO_ROOT)  # a folder the workers can read (process pool), or a git URL
    entrypoint: str = ENTRYPOINT
    cron: str = "0 3 * * 1"  # weekly retraining: Mondays 03:00
    timezone: str = "UTC"
    train_data: str | None = None  # the data location the weekly run reads; None: the flow's default
    eval_data: str | None = None
    params: dict[str, Any] = field(default_factory=dict)  # nested PipelineParams overrides for every deployment
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every run (OLIVEFLOW_HOME, ...)
    # Prefect result storage every worker shares (the stages' cache records): az://container[/folder], kept
    # in a prefect-azure AzureBlobStorageContainer block, or any other fsspec URL, kept in a RemoteFileSystem
    # block. None: each worker's local storage.
    result_storage: str | None = None


@dataclass(frozen=True)
class Spec:
    """One deployment, ready to send: what ``prefect deployment inspect`` would show of it."""

    name: str
    work_pool: str
    parameters: dict[str, Any]
    job_variables: dict[str, Any]
    description: str
    tags: tuple[str, ...] = ()
    cron: str | None = None
    timezone: str | None = None


def limit_name(site: Site, gpu: str, host: str | None = None) -> str:
    return f"{site.limit_prefix}-{host}-{gpu}" if host else f"{site.limit_prefix}-{gpu}"


def limits(site: Site) -> list[str]:
    if site.hosts:
        return [limit_name(site, gpu, host) for host in site.hosts for gpu in site.gpus]
    return [limit_name(site, gpu) for gpu in site.gpus]


def worker_commands(site: Site) -> dict[str, list[str]]:
    """What to start where, from the checkout, in the project's venv: {host: [command, ...]}."""
    if not site.hosts:
        gpu = [f"prefect worker start --pool {site.gpu_pool} --limit {len(site.gpus)}"]
        return {"this host": gpu + ([f"prefect worker start --pool {site.cpu_pool}"] if site.cpu_pool else [])}
    # A process worker hands its own environment to the runs it starts (job variables only add to it), so
    # one worker per GPU with --limit 1 binds runs to that GPU; the limit also guards against a second one.
    return {host: [f"CUDA_VISIBLE_DEVICES={gpu} {GPU_LIMIT_ENV}={limit_name(site, gpu, host)} prefect worker start "
                   f"--pool {site.gpu_pool} --limit 1 --name {host}-gpu{gpu}" for gpu in site.gpus]
            for host in site.hosts}


def flow_params(site: Site) -> dict[str, Any]:
    """The deployments' default ``params``, validated here so a bad value fails at deploy time, not at 3 am.

    Only what differs from the flow's own defaults is stored: fields left out are filled on the worker
    (the data paths, for instance, then point into the worker's checkout).
    """
    from oliveflow.config import PipelineParams

    raw = json.loads(json.dumps(site.params))
    if site.train_data is not None:
        raw.setdefault("data", {})["train_path"] = site.train_data
    if site.eval_data is not None:
        raw.setdefault("data", {})["eval_path"] = site.eval_data or None
    try:
        return PipelineParams.model_validate(raw).model_dump(mode="json", exclude_unset=True)
    except ValidationError as exc:
        raise SystemExit(f"deploy: {one_line(exc, 'default parameter')}; fix the --param/--*-data value") from None


def specs(site: Site) -> list[Spec]:
    """Shared defaults, then what each deployment changes."""
    params = flow_params(site)
    data = (params.get("data") or {}).get("train_path", "the flow's default data")
    env = {"OLIVE_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1", **site.env}
    if site.result_storage:
        env["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"] = result_block(site.result_storage)
    shared = dict(parameters={"params": params}, tags=("oliveflow",))

    def pinned(gpu: str) -> dict[str, Any]:
        # The flow holds limit <prefix>-<i> around its GPU stages: runs pinned to one GPU queue up there,
        # however many workers poll the pool.
        return {"env": {**env, "CUDA_VISIBLE_DEVICES": gpu, GPU_LIMIT_ENV: limit_name(site, gpu)}}

    if site.hosts:  # the worker that takes a run decides its GPU and limit (worker_commands)
        on_gpus = [Spec(name="gpu", work_pool=site.gpu_pool, job_variables={"env": env}, **shared,
                        description="oliveflow pipeline on whichever GPU worker takes it (one worker per GPU).")]
        weekly_gpu, weekly_env = "any GPU worker", {"env": env}
    else:
        on_gpus = [Spec(name=f"gpu-{gpu}", work_pool=site.gpu_pool, job_variables=pinned(gpu), **shared,
                        description=f"oliveflow pipeline on GPU {gpu}; runs on it queue up on limit "
                                    f"{limit_name(site, gpu)!r}.")
                   for gpu in site.gpus]
        weekly_gpu, weekly_env = f"GPU {site.gpus[0]}", pinned(site.gpus[0])
    weekly = Spec(name="retrain-weekly", work_pool=site.gpu_pool, job_variables=weekly_env,
                  cron=site.cron, timezone=site.timezone, **{**shared, "tags": ("oliveflow", "retrain")},
                  description=f"Retraining on {weekly_gpu}, {site.cron} ({site.timezone}), on the current data "
                              f"({data}): unchanged data and model make it an all-cache-hit run.")
    cpu = [Spec(name="cpu", work_pool=site.cpu_pool, job_variables={"env": {**env, "CUDA_VISIBLE_DEVICES": ""}},
                description="oliveflow pipeline on CPU only (no GPU limit).", **shared)] if site.cpu_pool else []
    return [*on_gpus, weekly, *cpu]


def pools(site: Site) -> dict[str, str]:
    out = {site.gpu_pool: f"oliveflow on GPUs; each GPU serialized by a concurrency limit "
                          f"({', '.join(limits(site))})."}
    if site.cpu_pool:
        out[site.cpu_pool] = "oliveflow on CPU only."
    return out


def result_block(url: str) -> str:
    """The slug of the block that holds the result storage at ``url``."""
    kind = "azure-blob-storage-container" if url.partition("://")[0] in AZURE_PROTOCOLS else "remote-file-system"
    return f"{kind}/{RESULT_BLOCK_NAME}"


def save_result_storage(url: str, settings: Settings | None = None) -> str:
    """Create or update the result-storage block for ``url``; return its slug.

    ``az://container[/folder]``: a prefect-azure block (the container is created when missing). Credentials:
    ``$AZURE_STORAGE_CONNECTION_STRING`` when set (kept in the block as a secret), else the account
    ``$AZURE_STORAGE_ACCOUNT_NAME`` with DefaultAzureCredential on each worker (no secret stored). Any other
    fsspec URL (s3://, gs://, a shared mount's file://...): Prefect's RemoteFileSystem block, whose credentials
    come from each worker's environment as its fsspec package reads them. ``settings``: the current ones by
    default.
    """
    protocol, sep, path = url.partition("://")
    if not sep or not path.strip("/"):
        raise SystemExit(f"deploy: --result-storage {url!r} is not a URL; write e.g. az://container/folder")
    if protocol not in AZURE_PROTOCOLS:
        from prefect.filesystems import RemoteFileSystem

        RemoteFileSystem(basepath=url).save(RESULT_BLOCK_NAME, overwrite=True)
        return result_block(url)

    from azure.core.exceptions import ResourceExistsError
    from azure.storage.blob import BlobServiceClient
    from prefect_azure import AzureBlobStorageContainer, AzureBlobStorageCredentials

    container, _, folder = path.partition("/")
    settings = settings or current()
    secret, account = settings.azure_storage_connection_string, settings.azure_storage_account_name
    connection = secret.get_secret_value() if secret else None
    if connection:
        credentials = AzureBlobStorageCredentials(connection_string=connection)
        service = BlobServiceClient.from_connection_string(connection)
    elif account:
        from azure.identity import DefaultAzureCredential

        credentials = AzureBlobStorageCredentials(account_url=f"https://{account}.blob.core.windows.net")
        service = BlobServiceClient(credentials.account_url, credential=DefaultAzureCredential())
    else:
        raise SystemExit("deploy: --result-storage az://... needs AZURE_STORAGE_CONNECTION_STRING or "
                         "AZURE_STORAGE_ACCOUNT_NAME in the environment")
    with contextlib.suppress(ResourceExistsError):
        service.create_container(container)
    AzureBlobStorageContainer(container_name=container, credentials=credentials,
                              base_folder=folder.strip("/") or None).save(RESULT_BLOCK_NAME, overwrite=True)
    return result_block(url)


def apply(site: Site, settings: Settings | None = None) -> dict[str, str]:
    """Create or update the pools, the GPU limits and the deployments; return {deployment name: id}."""
    from prefect import Flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import (
        GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate, WorkPoolCreate, WorkPoolUpdate,
    )
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.schedules import Cron
    from prefect.workers.process import ProcessWorker

    if site.result_storage:
        save_result_storage(site.result_storage, settings)
    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        for name, description in pools(site).items():
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process", description=description,
                                                       base_job_template=template))
            except ObjectAlreadyExists:
                client.update_work_pool(name, WorkPoolUpdate(description=description))
        for name in limits(site):
            try:
                client.read_global_concurrency_limit_by_name(name)
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))

    # from_source on a folder: the runs' pull step is set_working_directory(<folder>), so a process worker
    # runs the flow from the checkout wherever the worker itself was started. A git URL clones per run.
    flow = Flow.from_source(source=site.source, entrypoint=site.entrypoint)
    ids = {}
    for spec in specs(site):
        schedules = [Cron(spec.cron, timezone=spec.timezone, slug="weekly")] if spec.cron else None
        deployment = flow.to_deployment(
            name=spec.name, work_pool_name=spec.work_pool, parameters=spec.parameters,
            job_variables=spec.job_variables, description=spec.description, tags=list(spec.tags),
            schedules=schedules, enforce_parameter_schema=True)
        ids[spec.name] = str(deployment.apply())
    return ids


def _parse(argv: list[str] | None) -> tuple[Site, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m deployments.deploy", description=__doc__.split("\n\n")[0])
    d = Site()
    p.add_argument("--gpu-pool", default=d.gpu_pool, help="process work pool for GPU runs (default %(default)s)")
    p.add_argument("--cpu-pool", default=d.cpu_pool, help="process work pool for CPU runs (default %(default)s)")
    p.add_argument("--no-cpu", action="store_true", help="no CPU pool and no `cpu` deployment")
    p.add_argument("--gpus", default=",".join(d.gpus),
                   help="CUDA device indices, comma-separated (default %(default)s)")
    p.add_argument("--hosts", default="", help="several GPU hosts, comma-separated names: one unpinned `gpu` "
                                               "deployment, workers bound to GPUs, limits <prefix>-<host>-<i>")
    p.add_argument("--limit-prefix", default=d.limit_prefix,
                   help="prefix of the per-GPU concurrency limit names (default %(default)s)")
    p.add_argument("--source", default=d.source, help="code location the workers run: folder or git URL "
                                                        "(default: this checkout)")
    p.add_argument("--cron", default=d.cron, help="retraining schedule (default '%(default)s', weekly)")
    p.add_argument("--timezone", default=d.timezone)
    p.add_argument("--train-data", help="data location the deployments read (default: the flow's default)")
    p.add_argument("--eval-data", help="held-out data location; empty string for none")
    p.add_argument("--param", action="append", default=[], metavar="DOTTED=VALUE",
                   help="default flow parameter for every deployment, e.g. finetune.max_steps=200 (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for every run, e.g. OLIVEFLOW_HOME=/shared/oliveflow (repeatable)")
    p.add_argument("--artifact-store", help="artifact store every worker shares: a folder on a shared mount or an "
                                            "fsspec URL such as az://container/prefix (sets artifact_store)")
    p.add_argument("--result-storage", help="Prefect result storage every worker shares: az://container[/folder] "
                                            "(prefect-azure block) or another fsspec URL (RemoteFileSystem block), "
                                            f"saved as block {RESULT_BLOCK_NAME!r} and used by every deployment")
    p.add_argument("--dry-run", action="store_true", help="print pools, limits and deployments as JSON; no server")
    args = p.parse_args(argv)

    params: dict[str, Any] = {}
    try:
        add_params(params, args.param)  # the syntax of `oliveflow run --param`
    except InputError as exc:
        p.error(str(exc))
    if args.artifact_store:
        params["artifact_store"] = args.artifact_store
    env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--env {item!r} is not KEY=VALUE")
        env[key.strip()] = value
    gpus = tuple(g.strip() for g in args.gpus.split(",") if g.strip())
    if not gpus:
        p.error("--gpus needs at least one device index, e.g. --gpus 0")
    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip())
    site = Site(gpu_pool=args.gpu_pool, cpu_pool=None if args.no_cpu else args.cpu_pool, gpus=gpus, hosts=hosts,
                limit_prefix=args.limit_prefix, source=args.source, cron=args.cron, timezone=args.timezone,
                train_data=args.train_data, eval_data=args.eval_data, params=params, env=env,
                result_storage=args.result_storage)
    return site, args


def main(argv: list[str] | None = None) -> int:
    site, args = _parse(argv)
    if args.dry_run:
        print(json.dumps({"pools": pools(site), "limits": {name: 1 for name in limits(site)},
                          "deployments": [asdict(s) for s in specs(site)], "workers": worker_commands(site)},
                         indent=1))
        return 0
    try:
        settings = load()  # the environment, read once here (the dry run needs none of it)
    except InputError as exc:
        print(f"deploy: error: {exc}", file=sys.stderr)
        return 2
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("deploy: PREFECT_API_URL is not set; start a server (prefect server start) and export "
              "PREFECT_API_URL=http://HOST:4200/api", file=sys.stderr)
        return 2
    import httpx

    try:
        ids = apply(site, settings)
    except httpx.TransportError as exc:
        print(f"deploy: cannot reach the Prefect server at {PREFECT_API_URL.value()} ({type(exc).__name__}: {exc}); "
              "start it (prefect server start) or fix PREFECT_API_URL", file=sys.stderr)
        return 2
    for name, deployment_id in ids.items():
        print(f"{FLOW_NAME}/{name}\t{deployment_id}")
    for host, commands in worker_commands(site).items():
        print(f"# workers on {host}:", *commands, sep="\n#   ", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
