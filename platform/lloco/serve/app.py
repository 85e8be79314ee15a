"""The Serve application: the gRPC `Ingress` bound to the engine deployment.

`build_app(settings)` is for Python callers (`lloco up`, tests); `app` is the application builder that
serve configs and the Helm chart name as ``lloco.serve.app:app``: its ``args`` are Settings fields
(``store``, ``model``, ``limits``, ...), plus an optional ``config`` path to a settings YAML file.

The API's gRPC server runs inside each Ingress replica (`lloco.serve.server`), not in Serve's proxies:
deploy the application without ``grpc_options`` and without a route prefix (nothing of it is reachable
through Serve's HTTP proxy).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from ray.serve.deployment import Application

from lloco.config import Settings
from lloco.errors import InvalidArgument, Unavailable

if TYPE_CHECKING:
    from ray.serve.schema import ServeDeploySchema

IMPORT_PATH = "lloco.serve.app:app"


def build_app(settings: Settings) -> Application:
    """The ingress deployment bound to the engine deployment, both configured from `settings`."""
    from lloco.serve.engine import bind_engine
    from lloco.serve.ingress import Ingress

    ingress = Ingress.options(max_ongoing_requests=settings.serve.max_ongoing_requests)
    return ingress.bind(bind_engine(settings), settings)


def app(args: dict[str, Any]) -> Application:
    """Serve application builder: ``args`` are Settings fields, ``config`` a settings YAML path."""
    return build_app(_settings(args))


def _settings(args: dict[str, Any]) -> Settings:
    fields = dict(args)
    config = fields.pop("config", None)
    try:
        return Settings.load(config, **fields)
    except (OSError, ValueError) as error:
        raise InvalidArgument(f"bad lloco settings in the application args: {error}") from error


def load_serve_config(path: Path) -> ServeDeploySchema:
    """A Serve config file, checked as `serve deploy` would, plus its lloco applications' args.

    Every application's import path must resolve; for this package's builder, the args must make
    valid Settings; the config must not start Serve's gRPC proxy on the API's port (the Ingress
    replicas listen there). Any problem is InvalidArgument naming the file and the application.
    """
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise InvalidArgument(f"cannot read serve config {path}: {error.strerror}") from error
    except yaml.YAMLError as error:
        raise InvalidArgument(f"serve config {path} is not valid YAML: {error}") from error
    try:
        config = ServeDeploySchema.model_validate(data)
    except ValueError as error:
        raise InvalidArgument(f"serve config {path} is not a valid Serve config: {error}") from error
    for application in config.applications:
        try:
            builder = import_attr(application.import_path)
        except (ImportError, AttributeError, ValueError) as error:
            raise InvalidArgument(
                f"serve config {path}: application {application.name!r} has import_path "
                f"{application.import_path!r}, which cannot be imported: {error}"
            ) from error
        if builder is app:
            _settings(application.args or {})
            if config.grpc_options.grpc_servicer_functions:
                raise InvalidArgument(
                    f"serve config {path}: remove grpc_options.grpc_servicer_functions: the lloco API is "
                    "served by the Ingress replicas' own gRPC server (serve.host, serve.grpc_port)"
                )
            if application.route_prefix is not None:
                raise InvalidArgument(
                    f"serve config {path}: application {application.name!r} needs route_prefix: null "
                    "(the lloco API is gRPC only; nothing of it is served through Serve's HTTP proxy)"
                )
    return config


def deploy_config(path: Path, dashboard_address: str) -> list[str]:
    """Deploy a Serve config to the Ray cluster whose dashboard is at ``dashboard_address``.

    This is what `serve deploy` does, after `load_serve_config` has checked the file. Returns the
    names of the deployed applications.
    """
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    config = load_serve_config(path)
    try:
        ServeSubmissionClient(dashboard_address).deploy_applications(config.model_dump(exclude_unset=True))
    except (ConnectionError, RuntimeError) as error:
        raise Unavailable(f"cannot deploy to the Ray dashboard at {dashboard_address}: {error}") from error
    return [application.name for application in config.applications]
