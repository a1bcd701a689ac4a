"""New domain streams as a served Prefect deployment, triggered by inbox events.

``vpt-robust serve`` (``serve()`` here): uses ``PREFECT_API_URL`` or starts a Prefect server on
127.0.0.1, serves the deployment ``adapt-new-stream`` of the flow ``adapt-new-stream`` (one
flow run at a time: a deployment concurrency limit of 1, on top of the store's file lock) with
a trigger on the event ``vpt-robust.stream.arrived``, and watches ``streams.inbox``: each folder
that arrives (unchanged for ``streams.settle_seconds``) emits that event with its path, and the
trigger starts a flow run for it. A bad folder fails its own flow run; the watcher goes on.

The tasks call the plain functions of ``vpt_robust.streams``; ``vpt-robust stream PATH`` calls
the same function without Prefect.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from vpt_robust.config import ConfigError, Params, load_params, validate
from vpt_robust.streams import InboxWatcher, StreamFolderError, VersionError, validate_folder
from vpt_robust.streams.adapt import process_folder

EVENT = "vpt-robust.stream.arrived"
DEPLOYMENT = "adapt-new-stream"
FLOW = "adapt-new-stream"
_NO_RETRY = (StreamFolderError, VersionError, ConfigError)


def _retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a failed adaptation (it resumes from its checkpoint), never a bad folder/config."""
    try:
        state.result()
    except _NO_RETRY:
        return False
    except Exception:
        return True
    return False


@task(name="validate-and-hash", retries=0)
def check_folder(path: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate the folder and hash it the DVC way (a bad folder fails here, naming the file)."""
    cfg = validate(params).streams
    folder = validate_folder(path, min_size=cfg.min_image_size, max_images=cfg.max_images)
    return {
        "data_hash": folder.data_hash,
        "n_images": len(folder.files),
        "labels": folder.label_source,
    }


@task(
    name="adapt-evaluate-save",
    retries=2,
    retry_delay_seconds=1,
    retry_condition_fn=_retry_unless_bad_input,
)
def adapt_folder(
    path: str, params: dict[str, Any], from_version: int | None, pipeline_id: str
) -> dict[str, Any]:
    """Adapt, evaluate, log and save (or recognise known content): ``process_folder``."""
    return process_folder(
        path, validate(params), from_version=from_version, pipeline_id=pipeline_id
    )


@flow(name=FLOW, log_prints=True)
def adapt_new_stream(
    path: str,
    params_file: str = "params.yaml",
    from_version: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One arriving stream folder: validate and hash, then adapt from the latest version (or
    ``from_version``), evaluate, log to MLflow and save the new latest version; content seen
    before is recognised and adapts nothing."""
    logger = get_run_logger()
    params: Params = load_params(params_file, overrides=overrides)
    raw = params.model_dump(mode="json")
    checked = check_folder(path, raw)
    logger.info("stream %s: %d images, content %s", path, checked["n_images"], checked["data_hash"])
    pid = f"prefect-stream-{flow_run.get_id() or os.getpid()}"
    result = adapt_folder(path, raw, from_version, pid)
    if result["status"] == "known":
        logger.info(
            "content %s is version %s already: nothing adapted",
            result["data_hash"],
            result["version"],
        )
    else:
        logger.info(
            "version %s (parent %s), MLflow run %s",
            result["version"],
            result["parent"],
            result["mlflow_run_id"],
        )
    return result


# --------------------------------------------------------------------------- serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until the Prefect API at ``url`` answers its health check."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the Prefect server at {url} did not answer within {timeout:.0f} s")


def start_server(port: int | None = None) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` on 127.0.0.1 in its own process group; (process, API URL)."""
    port = port or free_port()
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_healthy(url, proc=proc)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group (its services are children)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def emit_arrival(path: Path) -> None:
    """The event the deployment trigger reacts to, carrying the folder's absolute path."""
    from prefect.events import emit_event

    emit_event(
        EVENT,
        resource={"prefect.resource.id": f"vpt-robust.stream.{path.name}", "path": str(path)},
        payload={"path": str(path)},
    )


def watch(inbox: Path, settle: float, poll: float, stop: threading.Event) -> None:
    """Emit an arrival event for every folder that lands in ``inbox`` until ``stop`` is set."""
    watcher = InboxWatcher(inbox, settle_seconds=settle)
    while not stop.is_set():
        for path in watcher.poll():
            print(f"stream arrived: {path}", flush=True)
            emit_arrival(path)
        stop.wait(poll)


def deployment(params_file: str) -> Any:
    """The deployment: ``adapt-new-stream`` with its event trigger and concurrency limit 1."""
    from prefect.events import DeploymentEventTrigger

    trigger = DeploymentEventTrigger(
        name="stream-arrived",
        expect={EVENT},
        match={"prefect.resource.id": "vpt-robust.stream.*"},
        parameters={"path": "{{ event.payload.path }}", "params_file": params_file},
    )
    return adapt_new_stream.to_deployment(
        name=DEPLOYMENT,
        triggers=[trigger],
        concurrency_limit=1,
        parameters={"params_file": params_file},
        description="Adapt the prompts on a new domain stream folder and keep the new version",
    )


def serve(params_file: str = "params.yaml") -> int:
    """Serve the deployment and watch the inbox until interrupted (see the module doc)."""
    from prefect import serve as prefect_serve

    params = load_params(params_file)
    params_file = str(Path(params_file).resolve())
    inbox = Path(params.streams.inbox).resolve()
    inbox.mkdir(parents=True, exist_ok=True)
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        server, url = start_server()
        os.environ["PREFECT_API_URL"] = url
        print(f"Prefect server on {url} (UI: {url[: -len('/api')]})", flush=True)
    served = deployment(params_file)
    served.apply()  # the trigger exists before the first arrival event is emitted
    stop = threading.Event()
    thread = threading.Thread(
        target=watch,
        args=(inbox, params.streams.settle_seconds, params.streams.poll_seconds, stop),
        daemon=True,
    )
    print(f"watching {inbox} for new stream folders", flush=True)
    thread.start()
    try:
        prefect_serve(served)
    finally:
        stop.set()
        if server is not None:
            stop_server(server)
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1] if len(sys.argv) > 1 else "params.yaml"))
