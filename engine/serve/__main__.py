"""python -m engine.serve --model NAME_OR_DIR [--dtype ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
[--max-num-seqs ...] [--kv-cache-memory-gb ...] [--enable-weight-updates --weights-dir DIR]; also `ettrl-serve`."""
from __future__ import annotations

import argparse
import logging

from engine import env


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine.serve", description=__doc__.split(";")[0])
    p.add_argument("--model", required=True, help="registry name (see engine/model_files.py) or HF model directory")
    p.add_argument("--served-model-name", default=None, help="the name clients send (default: --model's name)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=env.api_key(),
                   help="every request then needs 'Authorization: Bearer KEY' (env ETTRL_API_KEY)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--kv-cache-memory-gb", type=float, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--logprobs-mode", choices=("processed_logprobs", "raw_logprobs"), default="processed_logprobs",
                   help="processed_logprobs: softmax(logits / T), the distribution sampled from before top-k/top-p "
                        "(default); raw_logprobs: softmax(logits)")
    p.add_argument("--enable-weight-updates", action="store_true",
                   help="allow the routes that change state (weights, cache reset, pause, sleep)")
    p.add_argument("--weights-dir", default=None, help="update_weights_from_disk reads only under this directory")
    p.add_argument("--max-body-mb", type=float, default=64.0, help="size cap of JSON request bodies")
    p.add_argument("--max-weights-body-gb", type=float, default=16.0,
                   help="size cap of /update_weights_from_tensor bodies")
    p.add_argument("--reject-unknown-fields", action="store_true",
                   help="answer 400 to unknown request fields (default: ignore them with a warning, as vLLM)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def build_server(args: argparse.Namespace):
    from engine import LLM
    from engine.serve.api_server import Server, ServerConfig, model_name
    llm = LLM(args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
              kv_cache_memory_gb=args.kv_cache_memory_gb, block_size=args.block_size,
              enable_prefix_caching=not args.no_prefix_caching)
    config = ServerConfig(model_name=args.served_model_name or model_name(args.model), api_key=args.api_key,
                          enable_weight_updates=args.enable_weight_updates, weights_dir=args.weights_dir,
                          max_body_mb=args.max_body_mb, max_weights_body_gb=args.max_weights_body_gb,
                          logprobs_mode=args.logprobs_mode, reject_unknown_fields=args.reject_unknown_fields)
    return Server(llm, config)


def main(argv=None):
    try:
        import uvicorn
    except ImportError:
        raise SystemExit("the server needs FastAPI and uvicorn: pip install 'ettrl[serve]'") from None
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.weights_dir and not args.enable_weight_updates:
        logging.getLogger("engine.serve").warning("--weights-dir is unused without --enable-weight-updates")
    server = build_server(args)
    uvicorn.run(server.app, host=args.host, port=args.port, log_level=args.log_level)


if __name__ == "__main__":
    main()
