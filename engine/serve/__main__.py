"""python -m engine.serve --model NAME_OR_DIR [--host 127.0.0.1] [--port 8000] [--api-key KEY] [any EngineConfig
field as --field-name] [--enable-weight-updates --weights-dir DIR]; also `ettrl-serve`. --help lists every flag."""
from __future__ import annotations

import argparse
import logging
from dataclasses import asdict
from typing import TYPE_CHECKING

from engine import env
from engine.config import EngineConfig
from engine.dataclass_args import add_dataclass_args, dataclass_kwargs
from engine.serve.config import ServerConfig

if TYPE_CHECKING:  # annotations only: the server (and FastAPI) load in build_server
    from engine.serve.api_server import Server

ENGINE_ALIASES = {"enable_prefix_caching": ["--prefix-caching"]}  # --no-prefix-caching, the older spelling
SERVER_ALIASES = {"model_name": ["--served-model-name"]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__.split(";")[0])
    add_dataclass_args(p, EngineConfig, aliases=ENGINE_ALIASES, title="engine (EngineConfig)")
    add_dataclass_args(p, ServerConfig, aliases=SERVER_ALIASES, defaults={"api_key": env.api_key()},
                       title="server (ServerConfig)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    return EngineConfig(**dataclass_kwargs(EngineConfig, args)), ServerConfig(**dataclass_kwargs(ServerConfig, args))


def build_server(args: argparse.Namespace) -> Server:
    from engine import LLM
    from engine.serve.api_server import Server
    engine_config, server_config = configs(args)  # both checked before the model loads
    return Server(LLM(**asdict(engine_config)), server_config)


def main(argv: list[str] | None = None) -> None:
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("the server needs FastAPI and uvicorn: pip install 'ettrl[serve]'") from None
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.weights_dir and not args.enable_weight_updates:
        logging.getLogger("engine.serve").warning("--weights-dir is unused without --enable-weight-updates")
    try:
        server = build_server(args)
    except ValueError as e:  # a setting the engine or server refuses, a model that cannot be found
        raise SystemExit(f"python -m engine.serve: error: {e}") from None
    uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
