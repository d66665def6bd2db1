"""`omni serve` under load: continuous batching vs one request at a time, latency, memory.

    python -m benchmarks.bench_serve [--preset tiny] [--small] [--clients 8] [--long 500] [--threads 1] [--json OUT]
    python -m benchmarks.bench_serve --ckpt DEMO/model     # a trained demo model, every answer judged
    python -m benchmarks.bench_serve --ckpt DEMO/model --profile 25   # the bare sampler only, profiled

A random-weight model of the preset is saved as a checkpoint and served on 127.0.0.1 by a server
process running `omni serve`'s app, with the LM head given a bias towards <boi> so that an
interleaved answer really draws (as tests/test_generation.py `with_bias` does). Every client sends a mix of four requests, in turn:

    text     "what color is the square?"                   mode text   -> text parts only
    drawing  "draw a red circle left of a blue square."    mode image  -> exactly one image
    caption  [picture] "this is"                           mode text   -> text parts only
    story    "a story with pictures: the circle moves..."  mode auto   -> text and images

With `--ckpt` a trained checkpoint is served as it is, and client c's four requests are the c-th
held-out samples of shapes-vqa, shapes-t2i, shapes-caption and shapes-story, each answer judged by
its benchmark's judge (`trained_mix`; docs/serving.md).

1. The same requests (same seeds) one at a time, then from `--clients` concurrent clients, each
   on its own kept-alive connection (as the openai client sends them): throughput ratio, p50 /
   p95 time to first token (first streamed text or image start) and latency, decode steps the
   server ran; every answer checked for the right kinds of parts; every concurrent answer
   compared with its one-at-a-time twin (text equal, pixels within one step).
2. The bare sampler on the same requests, in this process (`bare_sampler`): one at a time, then
   one row per client, a client's next request added the step its last one finished. Its ratio
   is the ceiling of the serving layer on this machine: no HTTP, no client think time.
3. `--long` requests in a row (a text answer, every fifth a drawing): the server's resident
   memory every 50 requests and the mean latency of the first and last hundred.

On a CPU the server runs on `--threads` torch threads (1: the clients share the machine; with 2
on 2 cores the one-at-a-time run slows down more than the batched one, which flatters the ratio).
There the tiny preset is compute-bound once batched. The 32 requests take 746 decode steps one at
a time and ~120 with 8 clients (not 746 / 8 = 93: the clients finish their four requests at
different times, so the batch averages 6 rows), and a step with 6 rows (9 model streams, CFG
doubling the drawing rows) costs ~2.8x a step of one: the ceiling is 6.3 / 2.8 = ~2.3-2.9x.
Where a batched step went before the growing KV cache (tiny, 1 thread; docs/serving.md says what
it changed): decoder 4.6 ms, KV-cache growth by torch.cat 2.2
ms, cache gathers when rows start or stop drawing or leave 1.7 ms, merging joiners' caches 0.8
ms, diffusion head 4.3 ms (0.65 ms more per drawing row: compute), the rest 1.1 ms; of one row:
decoder 2.9 ms, head 1.7 ms. `--small` (the tests' 64-wide model) shows the overhead-bound
regime that a GPU is in for much larger models.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import io
import json
import os
import pstats
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from benchmarks.common import bench_config, interleaved_best

GEN = ["generation.image_steps=10", "generation.cfg_scale=2.0", "generation.max_new_tokens=48",
       "generation.temperature=0.8", "generation.max_images=2"]


def picture() -> str:
    from omni.serve.schemas import image_url

    im = Image.new("RGB", (32, 32), (240, 240, 240))
    im.paste((220, 40, 40), (4, 4, 14, 14))
    return image_url(im)


def mix(model: str) -> list[dict]:
    """The four kinds of request, each with what a correct answer holds."""
    img = {"type": "image_url", "image_url": {"url": picture()}}
    return [
        {"kind": "text", "want": {"text"}, "body": {"model": model, "mode": "text", "max_tokens": 24,
                                                     "messages": [{"role": "user", "content": "what color is the square?"}]}},
        {"kind": "drawing", "want": {"image"}, "body": {"model": model, "mode": "image", "messages": [
            {"role": "user", "content": "draw a red circle left of a blue square."}]}},
        {"kind": "caption", "want": {"text"}, "body": {"model": model, "mode": "text", "max_tokens": 24, "messages": [
            {"role": "user", "content": [img, {"type": "text", "text": "this is"}]}]}},
        {"kind": "story", "want": {"text", "image"}, "body": {"model": model, "mode": "auto", "max_tokens": 64,
                                                              "messages": [{"role": "user", "content":
                                                                            "a story with pictures: the circle moves to the right."}]}},
    ]


def texts(parts: list) -> str:
    return " ".join(x for k, x in parts if k == "text")


def images(parts: list) -> list[np.ndarray]:
    return [x for k, x in parts if k == "image"]


def trained_mix(model: str, clients: int) -> list[list[dict]]:
    """For a trained demo model: client c's four requests are the c-th held-out sample of the
    shapes benchmarks (procedural test split, the benchmarks' own phrasing), each with its judge:
    a question about an attached picture (shapes-vqa: the answer), a drawing (shapes-t2i: the
    detected objects match the prompt), a caption of an attached picture (shapes-caption: the
    parsed caption matches the scene), a story with pictures (shapes-story's free continuation: the
    text and image blocks in the story's order)."""
    from omni.eval.benchmarks_builtin import ShapesCaption, ShapesStory, ShapesT2I, ShapesVQA
    from omni.eval.judges import shapes as SJ
    from omni.serve.schemas import parts as content  # a prompt's text and pictures as content parts, in order

    vqa, t2i, cap, story = (b().samples(None, clients) for b in (ShapesVQA, ShapesT2I, ShapesCaption, ShapesStory))

    def parts(answer: list) -> list:  # a reference answer as `ask` returns parts
        return [("image", np.asarray(x.convert("RGB"))) if isinstance(x, Image.Image) else ("text", x) for x in answer]

    out = []
    for c in range(clients):
        v, t, k, s = vqa[c], t2i[c], cap[c], story[c]

        def drawn_ok(parts, spec=t.reference["geneval"]):
            return len(images(parts)) == 1 and SJ.check_spec(SJ.detect(images(parts)[0]), spec)[0]

        def story_ok(parts, want=s.reference["structure"]):
            return [kind for kind, _ in parts] == want

        def request(kind, sample, want, check, **fields):
            return {"kind": kind, "want": want, "check": check, "answer": parts(sample.answer),
                    "body": {"model": model, **fields, "messages": [{"role": "user", "content": content(sample.prompt)}]}}

        out.append([
            request("text", v, {"text"}, lambda p, a=v.reference["answer"]: SJ.answer_correct(texts(p), a),
                    mode="text", max_tokens=16),
            request("drawing", t, {"image"}, drawn_ok, mode="image"),
            request("caption", k, {"text"}, lambda p, o=k.reference["objects"]: SJ.caption_correct(texts(p), o),
                    mode="text", max_tokens=40),
            request("story", s, {"text", "image"}, story_ok, mode="auto", max_tokens=200, max_images=4),
        ])
    return out


SMALL = ["model.backbone.hidden_size=64", "model.backbone.num_layers=2", "model.backbone.num_heads=4",
         "model.backbone.intermediate_size=128", "model.head.width=64", "model.head.depth=2"]  # tests' size


def make_checkpoint(preset: str, tmp: Path, small: bool = False) -> Path:
    from omni.models.model import OmniModel

    cfg = bench_config(preset, tmp, GEN + (SMALL if small else []))
    torch.manual_seed(0)
    model = OmniModel.from_config(cfg.model).eval()
    with torch.no_grad():  # the head's zero-initialised output would draw flat grey; wake it
        for p in model.head.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    model.run_config = cfg
    path = tmp / "bench-model"
    model.save_pretrained(path)
    return path


def load_biased(ckpt: str):
    """The checkpoint with its LM head given a bias towards <boi> (random weights that decide to
    draw now and then; a checkpoint cannot hold the bias, as the backbone's LM head has none)."""
    import omni

    model = omni.load(ckpt, device="cpu")
    old = model.lm_head
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight.data.copy_(old.weight.data)
    head.bias.data.zero_()
    head.bias.data[model.special.boi] = 2.5
    model.backbone.lm_head = head
    return model


def load(ckpt: str, trained: bool):
    """A trained checkpoint as `omni serve` loads it; a random one with the <boi> bias."""
    if trained:
        import omni

        return omni.load(ckpt, device="cpu")
    return load_biased(ckpt)


def serve(ckpt: str, port: int, clients: int, trained: bool = False) -> None:
    """The server process: `omni serve`'s app on the checkpoint (random ones biased to draw)."""
    import uvicorn

    from omni.serve.app import create_app
    from omni.serve.schemas import Limits

    torch.set_grad_enabled(False)
    model = load(ckpt, trained)
    app = create_app(model, model_name=Path(ckpt).name, limits=Limits(max_running=clients))
    uvicorn.run(app, host="127.0.0.1", port=port, access_log=False, log_level="warning")


def ceiling(ckpt: str, plan: list[list[tuple[int, int, dict]]], threads: int, trained: bool = False,
            repeats: int = 1, profile: int = 0) -> dict:
    """The same requests on the bare sampler in this process, on as many threads as the server:
    one at a time, then as many rows as clients, each client's next request added the step its
    last one finished (no HTTP, no client think time). Its ratio is what the serving layer can
    reach on this machine; the server's can pass it a little, as the alone run pays the HTTP
    round trip of every request in series. `repeats`: the best of that many runs of each;
    `profile` N > 0: one more run of each under cProfile, its N costliest functions (by own time)
    printed to stderr."""
    from omni.inference.sampler import Sampler
    from omni.serve.engine import Turn, chat_prompt, default_config
    from omni.serve.schemas import Limits, parse_request

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    model = load(ckpt, trained)

    def job(body):
        req = parse_request(body, Limits())
        cfg = default_config(model, **req.overrides)
        return chat_prompt(model.tokenizer, [Turn(r, s) for r, s in req.messages]), cfg, cfg.mode, req.seed

    jobs = [[job(body) for _, _, body in reqs] for reqs in plan]

    def alone() -> int:
        steps = 0
        for reqs in jobs:
            for j in reqs:
                sampler = Sampler(model, cfg=default_config(model))
                sampler.add(*j)
                while sampler.live or sampler.joining:
                    sampler.step()
                    steps += 1
        return steps

    rows_live: list[int] = []

    def crowd() -> int:
        sampler = Sampler(model, cfg=default_config(model))
        queues = [list(reqs) for reqs in jobs]
        owner = {id(sampler.add(*q.pop(0))): c for c, q in enumerate(queues)}
        steps = 0
        rows_live.clear()
        while sampler.live or sampler.joining:
            rows_live.append(len(sampler.live) + len(sampler.joining))
            for row in sampler.step():
                c = owner.pop(id(row))
                if queues[c]:
                    owner[id(sampler.add(*queues[c].pop(0)))] = c
            steps += 1
        return steps

    runs = {"alone": alone, "concurrent": crowd}
    steps: dict[str, int] = {}

    def counted(name: str):
        def run() -> None:
            steps[name] = runs[name]()  # the same plan: the same count every run
        return run

    try:
        with torch.no_grad():
            # every path warmed up once, then the runs in rounds (alone, concurrent, alone, ...)
            best = interleaved_best({name: counted(name) for name in runs}, torch.device("cpu"), max(1, repeats))
            out = {}
            for name in runs:
                out[f"{name}_s"] = best[name]
                out[f"{name}_steps"] = steps[name]
                out[f"{name}_step_ms"] = 1000 * best[name] / steps[name]
            out["concurrent_mean_rows"] = statistics.mean(rows_live)
            for name, f in runs.items() if profile else ():
                prof = cProfile.Profile()
                prof.runcall(f)
                print(f"\n== bare sampler, {name}: the {profile} costliest functions by own time ==", file=sys.stderr)
                pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(profile)
        out["throughput_ratio"] = out["alone_s"] / out["concurrent_s"]
        return out
    finally:
        torch.set_num_threads(before)


def ask(http: httpx.Client, url: str, body: dict) -> dict:
    """One streamed request on a client's kept-alive connection (as the openai client sends them):
    parts in order, time to first token, latency."""
    t0 = time.perf_counter()
    first, parts, finish = None, [], None
    with http.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=300) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"]["message"])
            delta = ev["choices"][0]["delta"]
            if first is None and (delta.get("content") or "image_start" in delta):
                first = time.perf_counter() - t0
            if delta.get("content"):
                if parts and parts[-1][0] == "text":
                    parts[-1] = ("text", parts[-1][1] + delta["content"])
                else:
                    parts.append(("text", delta["content"]))
            if "image" in delta:
                data = base64.b64decode(delta["image"]["image_url"]["url"].split(",", 1)[1])
                parts.append(("image", np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))
            finish = ev["choices"][0]["finish_reason"] or finish
    return {"parts": parts, "ttft": first if first is not None else time.perf_counter() - t0,
            "latency": time.perf_counter() - t0, "finish": finish}


def same(a: list, b: list) -> bool:
    if [k for k, _ in a] != [k for k, _ in b]:
        return False
    return all(x == y if k == "text" else int(np.abs(x.astype(int) - y.astype(int)).max()) <= 1
               for (k, x), (_, y) in zip(a, b))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]


def summary(results: list[dict]) -> dict:
    ttft = [r["ttft"] for r in results]
    lat = [r["latency"] for r in results]
    return {"ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95), "latency_p50_s": pct(lat, 50),
            "latency_p95_s": pct(lat, 95)}


def make_plan(model: str, clients: int, trained: bool) -> tuple[list[list[dict]], list[list[tuple[int, int, dict]]]]:
    """Each client's four requests (`trained_mix` or the random model's `mix`, rotated) and the
    plan: per client, (client, k, request body), request (c, k) always with the same seed."""
    if trained:  # client c: its own held-out samples of the four kinds, each judged
        kinds_of = trained_mix(model, clients)
    else:  # client c sends the same four kinds, rotated
        kinds = mix(model)
        kinds_of = [[kinds[(c + k) % 4] for k in range(4)] for c in range(clients)]
    plan = [[(c, k, {**kinds_of[c][k]["body"], "seed": 1000 + 4 * c + k}) for k in range(4)] for c in range(clients)]
    return kinds_of, plan


def run(preset: str = "tiny", clients: int = 8, long: int = 500, small: bool = False, threads: int = 1,
        trained: str | None = None) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    ckpt = Path(trained).resolve() if trained else make_checkpoint(preset, tmp, small)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp / "server.log", "w")  # noqa: SIM115  (open for the server's whole life)
    server = subprocess.Popen([sys.executable, "-m", "benchmarks.bench_serve", "--serve", str(ckpt), "--port", str(port),
                               "--clients", str(clients)] + (["--trained"] if trained else []), stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start: " + (tmp / "server.log").read_text()[-2000:]) from None
                time.sleep(0.2)
        kinds_of, plan = make_plan(ckpt.name, clients, bool(trained))
        http = httpx.Client()
        for c, k, body in plan[0]:
            ask(http, url, body)  # warm up every path once
        steps0 = httpx.get(f"{url}/health").json()["steps"]
        t = time.perf_counter()
        alone = {(c, k): ask(http, url, body) for reqs in plan for c, k, body in reqs}
        t_alone = time.perf_counter() - t
        steps1 = httpx.get(f"{url}/health").json()["steps"]

        https = [httpx.Client() for _ in plan]  # made before the clock starts (each builds an SSL context)

        def client(reqs):
            own = https[reqs[0][0]]
            return [((c, k), ask(own, url, body)) for c, k, body in reqs]

        t = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            crowd = dict(pair for got in pool.map(client, plan) for pair in got)
        t_crowd = time.perf_counter() - t
        steps2 = httpx.get(f"{url}/health").json()["steps"]

        wrong, differ, judged = [], [], {}
        for (c, k), r in crowd.items():
            kind = kinds_of[c][k]
            for which, res in (("concurrent", r), ("alone", alone[(c, k)])):
                if {p for p, _ in res["parts"]} != kind["want"]:
                    wrong.append(f"{which} {kind['kind']} c{c}k{k}: {[p for p, _ in res['parts']]}")
                if "check" in kind:  # a trained model's answer, judged
                    n_ok = judged.setdefault(which, {}).setdefault(kind["kind"], [0, 0])
                    n_ok[0] += bool(kind["check"](res["parts"]))
                    n_ok[1] += 1
            if not same(r["parts"], alone[(c, k)]["parts"]):
                differ.append(f"{kind['kind']} c{c}k{k}")
        n = len(crowd)
        out = {
            "requests": n, "clients": clients, "alone_s": t_alone, "concurrent_s": t_crowd,
            "throughput_alone_rps": n / t_alone, "throughput_concurrent_rps": n / t_crowd,
            "throughput_ratio": t_alone / t_crowd,
            "steps_alone": steps1 - steps0, "steps_concurrent": steps2 - steps1,
            "alone": summary(list(alone.values())), "concurrent": summary(list(crowd.values())),
            "wrong_kinds": wrong, "same_seed_differs": differ,
            "kinds": {k["kind"]: sorted(k["want"]) for k in kinds_of[0]},
        }
        if judged:  # correct / asked, per kind
            out["correct"] = {which: {kind: f"{a}/{b}" for kind, (a, b) in per.items()} for which, per in judged.items()}

        out["bare_sampler"] = ceiling(str(ckpt), plan, threads, bool(trained))  # the server sits idle meanwhile

        # many requests in a row: memory and latency must not creep
        rss, lat = [], []
        small = {**kinds_of[0][0]["body"], "max_tokens": 16}
        for i in range(long):
            body = {**(kinds_of[0][1]["body"] if i % 5 == 4 else small), "seed": i}
            lat.append(ask(http, url, body)["latency"])
            if (i + 1) % 50 == 0:
                rss.append((i + 1, round(rss_mib(server.pid), 1)))
        head, tail = lat[: min(100, long)], lat[-min(100, long):]
        out["long"] = {"requests": long, "rss_mib": rss, "latency_first100_mean_s": statistics.mean(head),
                       "latency_median_by_100_s": [round(statistics.median(lat[i:i + 100]), 4)
                                                   for i in range(0, long, 100)],
                       "latency_last100_mean_s": statistics.mean(tail),
                       "rss_growth_after_100_mib": (rss[-1][1] - rss[1][1]) if len(rss) > 2 else None}
        out["health"] = httpx.get(f"{url}/health").json()
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--long", type=int, default=500, help="requests in a row for the memory check")
    p.add_argument("--small", action="store_true", help="the tests' model size (64 wide, 2 layers), not the preset's")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server (and of the bare sampler)")
    p.add_argument("--ckpt", help="a trained checkpoint (e.g. a demo's DIR/model): the held-out benchmarks' requests, "
                   "each answer judged, instead of a random model's")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="only the bare sampler (no server): its two runs, best of 3, then each once under "
                   "cProfile, printing its N costliest functions")
    p.add_argument("--trained", action="store_true", help=argparse.SUPPRESS)  # the server process: no bias
    p.add_argument("--serve", metavar="CKPT", help=argparse.SUPPRESS)  # the server process
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port, args.clients, args.trained)
        return 0
    if args.ckpt and not (Path(args.ckpt) / "config.yaml").is_file():
        p.error(f"--ckpt {args.ckpt}: not a checkpoint directory (no config.yaml); give a trained model, "
                "e.g. OUT/model of `omni demo --out OUT`")
    if args.profile:
        with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
            ckpt = str(Path(args.ckpt).resolve()) if args.ckpt else str(make_checkpoint(args.preset, Path(tmp), args.small))
            out = ceiling(ckpt, make_plan(Path(ckpt).name, args.clients, bool(args.ckpt))[1], args.threads,
                          bool(args.ckpt), repeats=3, profile=args.profile)
        print(json.dumps(out, indent=2))
        return 0
    out = run(args.preset, args.clients, args.long, args.small, args.threads, args.ckpt)
    out["model"] = args.ckpt or f"{args.preset}{' (small)' if args.small else ''}"
    out["threads"] = args.threads
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = out["throughput_ratio"] >= 4 and not out["wrong_kinds"] and not out["same_seed_differs"]
    print(f"\nthroughput x{out['throughput_ratio']:.2f} (target 4; the bare sampler on the same requests "
          f"x{out['bare_sampler']['throughput_ratio']:.2f}), wrong kinds {len(out['wrong_kinds'])}, "
          f"same-seed differences {len(out['same_seed_differs'])}"
          + (f", correct {out['correct']}" if "correct" in out else "") + f": {'ok' if ok else 'MISSED'}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
