"""``edgeseg export-triton`` and ``edgeseg triton serve``: serving a bundle from Triton.

Also the ``--backend`` option type of ``run`` and ``bench``: a named backend, or
``triton://HOST:PORT/MODEL``.
"""

from __future__ import annotations

import signal
import sys
import time

import click

LOCAL_BACKENDS = ("auto", "cpu", "openvino", "onnxruntime", "tensorrt")


class BackendType(click.ParamType):
    """One of the local backends, or ``triton://HOST:PORT/MODEL``."""

    name = "backend"

    def get_metavar(self, param, ctx=None) -> str:  # click 8.2 passes ctx
        return "[" + "|".join(LOCAL_BACKENDS) + "|triton://HOST:PORT/MODEL]"

    def convert(self, value, param, ctx):
        if value in LOCAL_BACKENDS:
            return value
        if isinstance(value, str) and value.startswith("triton://"):
            from edgeseg.triton.client import parse_target

            try:
                parse_target(value)
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
            return value
        self.fail(
            f"{value!r}: choose from {', '.join(LOCAL_BACKENDS)}, or triton://HOST:PORT/MODEL", param, ctx
        )


BACKEND = BackendType()


@click.command("export-triton")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.argument("repo_dir", type=click.Path(file_okay=False))
@click.option("--model-name", default=None, help="Triton model name (default: the bundle's name).")
@click.option(
    "--instances", default=1, show_default=True, type=click.IntRange(min=1), help="Model instances."
)
@click.option(
    "--max-batch",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="2D models: max_batch_size with dynamic batching (series of one shape handled together).",
)
@click.option(
    "--gpu",
    is_flag=True,
    help="A GPU server: KIND_GPU instances running edgeseg's TensorRT path (plan built there from the ONNX).",
)
@click.option(
    "--backend",
    "server_backend",
    type=click.Choice(LOCAL_BACKENDS),
    default=None,
    help="Engine the server's model opens (default: cpu, or tensorrt with --gpu).",
)
@click.option(
    "--threads", type=int, default=None, help="CPU threads per instance (default: cores / instances)."
)
@click.option("--precision", default=None, help="Precision the server's engine uses (default: the bundle's).")
@click.option("--no-tta", is_flag=True, help="Serve without test-time mirroring.")
@click.option("--link", is_flag=True, help="Symlink the bundle into the repository instead of copying it.")
def export_triton(
    bundle, repo_dir, model_name, instances, max_batch, gpu, server_backend, threads, precision, no_tta, link
):
    """Write a Triton model repository in REPO_DIR that serves BUNDLE.

    Clients segment through it with --backend triton://HOST:PORT/MODEL (gRPC port), sending only
    the stored pixels; the model returns uint8 labels on the source grid.
    """
    from edgeseg.export.triton import write_repository

    try:
        out = write_repository(
            bundle,
            repo_dir,
            model_name=model_name,
            instances=instances,
            gpu=gpu,
            max_batch=max_batch,
            backend=server_backend,
            threads=threads,
            tta=not no_tta,
            precision=precision,
            link=link,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(
        f"wrote {out.model_dir} (model '{out.model_name}', bundle manifest sha256 {out.bundle_sha256[:12]})"
    )
    click.echo(f"serve it:   edgeseg triton serve {out.repo}")
    click.echo(f"segment:    edgeseg run {bundle} INPUTS --backend triton://127.0.0.1:8001/{out.model_name}")


@click.group("triton")
def triton() -> None:
    """Run a Triton Inference Server for exported models (nvidia-pytriton's tritonserver)."""


@triton.command("serve")
@click.argument("repo", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--grpc-port", default=8001, show_default=True, type=int)
@click.option("--http-port", default=8000, show_default=True, type=int)
@click.option("--metrics-port", default=8002, show_default=True, type=int, help="0: no metrics endpoint.")
@click.option(
    "--wait", "wait_s", default=300.0, show_default=True, help="Seconds to wait for the models to load."
)
def serve(repo, host, grpc_port, http_port, metrics_port, wait_s):
    """Start tritonserver on REPO (from the nvidia-pytriton wheel) until Ctrl-C or SIGTERM."""
    from edgeseg.triton.server import TritonServer

    server = TritonServer(
        repo, host=host, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port or None
    )
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    server.start(wait_s=wait_s)
    click.echo(
        f"tritonserver ready: gRPC {host}:{grpc_port}, HTTP {host}:{http_port}"
        + (f", metrics {host}:{metrics_port}" if metrics_port else "")
        + f"; log {server.log_file}",
        err=True,
    )
    try:
        while not stop["now"] and server.proc is not None and server.proc.poll() is None:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        code = server.proc.poll() if server.proc is not None else None
        server.stop()
    if code not in (None, 0):
        click.echo(f"tritonserver exited with code {code}: {server.log_tail()}", err=True)
        sys.exit(1)
