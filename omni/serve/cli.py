"""`omni serve`: an OpenAI-compatible HTTP API and a web chat page for one checkpoint.

    omni serve --ckpt DIR [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--api-key KEY]

Then open http://127.0.0.1:8000/ for the chat page, or point any OpenAI client at
http://127.0.0.1:8000/v1 (docs/serving.md has the formats). It binds 127.0.0.1 unless --host
says otherwise; with --api-key (or OMNI_API_KEY) the /v1 routes need `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import argparse
import os

from omni.inference.cli import positive_int


def run(args: argparse.Namespace) -> int:
    import logging

    import torch
    import uvicorn

    from omni.serve.app import create_app, model_name_of
    from omni.serve.engine import load_model
    from omni.serve.schemas import Limits

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not (args.api_key or os.environ.get("OMNI_API_KEY")):
        logging.getLogger("omni.serve").warning("binding %s without --api-key: anyone who can reach it may use it",
                                                args.host)
    limits = Limits(max_running=args.max_batch, max_waiting=args.max_waiting, max_prompt_tokens=args.max_prompt_tokens,
                    max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
                    request_timeout=args.timeout, allow_remote_images=args.allow_remote_images)
    check_port(args.host, args.port)  # before the model loads: a taken port is known at once
    torch.set_grad_enabled(False)
    model = load_model(args.ckpt, args.device)
    app = create_app(model, model_name=args.model_name or model_name_of(args.ckpt), limits=limits,
                     api_key=args.api_key or os.environ.get("OMNI_API_KEY") or None)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0


def check_port(host: str, port: int) -> None:
    """Bind (host, port) once, as uvicorn will (SO_REUSEADDR), and let go; a ValueError names the fix."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address of this machine ({e.strerror}); use 127.0.0.1") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror} (another `omni serve` or program has "
                             "it?); pass another --port, e.g. --port 8001") from None


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API and web chat page",
                       description=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="inference checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", dest="api_key", help="require this bearer key on /v1 (default: $OMNI_API_KEY)")
    p.add_argument("--model-name", dest="model_name", help="model id in /v1/models (default: the checkpoint folder)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-batch", type=positive_int, default=8, dest="max_batch", help="requests running at once")
    g.add_argument("--max-waiting", type=int, default=32, dest="max_waiting",
                   help="requests queued for a slot; more get 429 with Retry-After")
    g.add_argument("--max-prompt-tokens", type=positive_int, dest="max_prompt_tokens",
                   help="prompt positions per request (default: the context)")
    g.add_argument("--max-image-bytes", type=positive_int, default=8 << 20, dest="max_image_bytes",
                   help="bytes of one image file (default 8 MiB)")
    g.add_argument("--max-image-pixels", type=positive_int, default=4096 * 4096, dest="max_image_pixels",
                   help="width x height of one image (default 4096x4096)")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds per request, waiting included")
    g.add_argument("--allow-remote-images", action="store_true", dest="allow_remote_images",
                   help="fetch http(s) image URLs (default: only inline data: URLs)")
    p.set_defaults(func=run)
