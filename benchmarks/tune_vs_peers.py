"""Tuned against untuned against the peers, in one run on this machine: the way saikyo is judged.

    for m in squeezenet1_1 resnet50; do saikyo models export $m --weights random --quantize int8; done
    python -m venv .venv-peers && .venv-peers/bin/pip install -r benchmarks/peers/requirements.txt
    PYTHONPATH=src python benchmarks/tune_vs_peers.py --out tune-vs-peers.jsonl     # about 50 min on 2 cores
    PYTHONPATH=src python benchmarks/tune_vs_peers.py --quick --models squeezenet1_1 --images-per-request 8

For each model, every peer (benchmarks/peer_servers.py: Flask, LitServe, Triton through PyTriton and
BentoML, each on ONNX Runtime and on OpenVINO at its default precision, batching on where the framework has
it) is started once on the same model.onnx; then for each traffic shape (--images-per-request, default 8
and 1):
  1. `saikyo tune MODEL --images-per-request K --p99 P` (its own records into --out) stores the tuning for
     this CPU in the repository (and NAME-int8's when that is faster with its top-1 kept);
  2. these saikyo servers start beside the peers:
       tuned       `saikyo serve --models MODEL`: the tuning applies;
       untuned     `saikyo serve --models MODEL --no-tuning`: the static rule and the defaults;
       guarded     `saikyo serve --models MODEL-int8` with its tuning, when tune chose it for this shape
                   (another precision: reported apart, with its top-1 agreement);
  3. every server, peers included, gets --concurrency clients in a closed loop for --seconds, in turn, for
     --rounds rounds (benchmarks/backends.py's interleaved rounds: a slow spell of a shared machine spreads
     over all of them); each server's median round counts. The same load generator drives all; PyTriton
     reads the Open Inference Protocol (Triton's own), the rest the multipart /classify, both carrying the
     same JPEGs and answering the top 5.

Every round is a JSON line in --out (with the machine). The last lines, one per model and shape:
  tune_vs_peers model=... images_per_request=K tuned_img_s=... untuned_img_s=... best_peer=... best_peer_img_s=...
      tuned_vs_best_peer=<ratio> target=<1.3 squeezenet1_1, 1.15 resnet50> [guarded=NAME-int8 ... agreement]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import peer_servers
from backends import Target, interleaved_rounds
from peer_servers import peer_server
from saikyo.bench.hardware import describe
from saikyo.bench.load import read_images
from saikyo.bench.localserver import ServerStartError, local_server
from saikyo.models import tunings, zoo
from saikyo.models.repository import ModelRepository, export_command

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests" / "data"
TARGETS = {"squeezenet1_1": 1.3, "resnet50": 1.15}  # the issue's: tuned / best peer at equal precision
# p99 targets (ms) for tune's capacity search, by model and images per request: loose enough that every
# configuration passes at some rate here.
P99_MS = {("squeezenet1_1", 1): 100, ("squeezenet1_1", 8): 500, ("resnet50", 1): 500, ("resnet50", 8): 3000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", default="model-repository")
    ap.add_argument("--models", default="squeezenet1_1,resnet50")
    ap.add_argument("--images-per-request", default="8,1")
    ap.add_argument("--peers", default=",".join(peer_servers.FRAMEWORKS), help="comma-separated frameworks")
    ap.add_argument("--p99", type=float, help="ms, tune's target for every model and shape [default: this file's table]")
    ap.add_argument("--tune-budget", type=float, default=180.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=12.0, help="per server and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="short tune and one short round: checks the flow")
    ap.add_argument("--out", type=Path, default=Path("tune-vs-peers.jsonl"))
    args = ap.parse_args()
    if args.quick:
        args.tune_budget, args.seconds, args.rounds = min(args.tune_budget, 40.0), 3.0, 1
    repo = ModelRepository(args.repository)
    models = [m for m in args.models.split(",") if m]
    missing = [m for m in models if not repo.has(m)]
    if missing:
        sys.exit("not exported: " + "; ".join(export_command(m) for m in missing))
    hw = describe()
    machine = {"cpu_model": hw.cpu_model, "cores": hw.cores, "memory_gib": hw.memory_gib}
    say(f"machine: {machine}")

    def emit(record: dict[str, Any]) -> None:
        print("  " + json.dumps(record), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps({**record, **machine, "concurrency": args.concurrency, "seconds": args.seconds,
                                "time": time.time()}) + "\n")  # fmt: skip

    peers = peer_servers.available([p for p in args.peers.split(",") if p], say)
    images = read_images(PHOTOS)
    lines = []
    with tempfile.TemporaryDirectory(prefix="saikyo-tune-vs-peers-") as tmp:
        logs = Path(tmp)
        for model in models:
            with contextlib.ExitStack() as stack:
                peer_targets = {}
                for peer in peers:
                    try:
                        url = stack.enter_context(peer_server(repo.model_dir(model), peer, logs))
                    except ServerStartError as exc:
                        say(f"{model} {peer}: {exc}")
                        continue
                    peer_targets[peer] = Target(url, model, peer_servers.protocol(peer))
                    say(f"{model} {peer}: up at {url}")
                for k in (int(x) for x in args.images_per_request.split(",")):
                    p99 = args.p99 or P99_MS.get((model, k), 1000)
                    lines.append(one(repo, model, k, p99, peer_targets, images, logs, args, emit))
    for line in lines:
        print(line, flush=True)


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def one(repo: ModelRepository, model: str, k: int, p99: float, peer_targets: dict[str, Target], images: Any,
        logs: Path, args: argparse.Namespace, emit: Any) -> str:  # fmt: skip
    say(f"{model} x{k}: saikyo tune (budget {args.tune_budget:g} s, p99 <= {p99:g} ms)")
    tune = subprocess.run(
        [sys.executable, "-m", "saikyo", "tune", model, "--repository", str(repo.root), "--images-per-request", str(k),
         "--p99", f"{p99}ms", "--budget", str(args.tune_budget), "--out", str(args.out)],
    )  # fmt: skip (its progress and tables go straight to this terminal)
    if tune.returncode != 0:
        say(f"{model} x{k}: saikyo tune exited {tune.returncode}; 'tuned' below is what the repository held before")
    tuning = tuned_on_this_cpu(repo, model)
    ours: dict[str, tuple[str, list[str]]] = {"tuned": (model, []), "untuned": (model, ["--no-tuning"])}
    int8 = zoo.variant_name(model, "int8")
    guarded = tuned_on_this_cpu(repo, int8)
    if guarded is not None and (guarded.images_per_request, guarded.p99_ms) != (k, p99):
        guarded = None  # from another run: this tune did not choose it
    if guarded is not None:
        ours["guarded"] = (int8, [])
    with contextlib.ExitStack() as stack:
        targets = {}
        for role, (name, flags) in ours.items():
            try:
                server = stack.enter_context(local_server(repo.root, name, logs, [*flags, "--log-level", "warning"]))
            except ServerStartError as exc:
                say(f"{model} x{k} {role}: {exc}")
                continue
            targets[role] = Target(server.url, name)
        targets.update(peer_targets)
        say(f"{model} x{k}: {len(targets)} servers, {args.rounds} round(s) of {args.seconds:g} s each")
        found = interleaved_rounds(targets, images, k, args.concurrency, args.seconds, args.rounds,
                                   lambda rec: emit({**rec, "images_per_request": k}))  # fmt: skip
    emit({"section": "summary", "model": model, "images_per_request": k, "p99_target_ms": p99,
          "tuning": tuning.choice if tuning else None, "guarded": guarded.choice if guarded else None,
          "guarded_agreement": guarded.agreement if guarded else None, "median_rounds": found})  # fmt: skip
    img_s = {role: row["img_s"] for role, row in found.items()}
    peers = {r: v for r, v in img_s.items() if "+" in r}
    best = max(peers, key=peers.__getitem__, default="none")
    ratio = img_s.get("tuned", 0.0) / peers[best] if peers.get(best) else float("nan")
    extra = ""
    if guarded is not None and "guarded" in img_s:
        extra = (f" guarded={int8} guarded_img_s={img_s['guarded']:.1f} guarded_vs_best_peer="
                 f"{img_s['guarded'] / peers[best] if peers.get(best) else float('nan'):.3f} "
                 f"guarded_agreement={guarded.agreement}")  # fmt: skip
    return (f"tune_vs_peers model={model} images_per_request={k} "
            f"tuned_img_s={img_s.get('tuned', 0.0):.1f} untuned_img_s={img_s.get('untuned', 0.0):.1f} "
            f"best_peer={best} best_peer_img_s={peers.get(best, 0.0):.1f} tuned_vs_best_peer={ratio:.3f} "
            f"target={TARGETS.get(model, float('nan'))}{extra}")  # fmt: skip


def tuned_on_this_cpu(repo: ModelRepository, name: str) -> tunings.Tuning | None:
    if not repo.has(name):
        return None
    hw = describe()
    return tunings.find(repo, name, hw.cpu_model, hw.cores or 1).tuning


if __name__ == "__main__":
    main()
