"""Head-of-line check: small requests' latency while big photos arrive on the same server.

    python -m benchmarks.big_photos [--seconds 10] [--side 4000] [--interval 0.5]

Starts digitflow the recommended way, then runs wrk (c=16, one MNIST PNG per request) twice:
alone (the baseline of this run), and while another client posts a `--side`² JPEG photo of a
digit every `--interval` seconds. Prints small-request p50/p90/p99 for both and the big photos'
own latency.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw
from tests.support.processes import stop_process

from benchmarks import http_load
from benchmarks.run import default_checkpoint, load_samples, server_specs
from digitflow import paths


def big_photo(side: int) -> bytes:
    """A dark hand-drawn-like 7 on white paper, `side` pixels square, as JPEG."""
    image = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(image)
    s = side / 4000
    draw.line([(1500 * s, 800 * s), (2500 * s, 800 * s), (1800 * s, 3200 * s)], 0, int(180 * s))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def post_repeatedly(url: str, body: bytes, interval: float, stop: threading.Event) -> list[float]:
    """POST `body` every `interval` s until `stop`; the latency of each answer, in seconds."""
    latencies = []
    headers = {"Content-Type": f"multipart/form-data; boundary={http_load.BOUNDARY}"}
    while not stop.is_set():
        started = time.perf_counter()
        request = urllib.request.Request(url + http_load.PREDICT_PATH, body, headers)
        with urllib.request.urlopen(request, timeout=60) as answer:
            answer.read()
        latencies.append(time.perf_counter() - started)
        stop.wait(interval)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--side", type=int, default=4000)
    parser.add_argument("--interval", type=float, default=0.5)
    args = parser.parse_args()
    checkpoint = default_checkpoint()
    samples = load_samples(paths.DEFAULT_DATA_DIR)
    photo = http_load.multipart_body([(big_photo(args.side), "big_7.png")])
    with tempfile.TemporaryDirectory(prefix="digitflow-bench-") as tmp:
        bodies = http_load.write_bodies(samples, Path(tmp) / "single", 1, len(samples))
        spec = server_specs(checkpoint)["digitflow"]
        server = http_load.start_server(spec, Path(tmp), bodies / "0.bin")
        try:
            http_load.run_wrk(server.url, bodies, 16, 3)  # warm-up
            alone = http_load.run_wrk(server.url, bodies, 16, args.seconds)
            stop = threading.Event()
            big: list[float] = []
            sender = threading.Thread(
                target=lambda: big.extend(post_repeatedly(server.url, photo, args.interval, stop))
            )
            sender.start()
            mixed = http_load.run_wrk(server.url, bodies, 16, args.seconds)
            stop.set()
            sender.join()
        finally:
            stop_process(server)
    print(f"small requests (c=16), {args.side}x{args.side} JPEG every {args.interval:g} s:")
    print("| run | req/s | p50 ms | p90 ms | p99 ms |\n|---|---:|---:|---:|---:|")
    for name, r in (("alone", alone), ("with big photos", mixed)):
        rate = r["requests"] / (r["duration_us"] / 1e6)
        print(
            f"| {name} | {rate:,.0f} | {r['p50_us'] / 1000:.1f} | {r['p90_us'] / 1000:.1f} "
            f"| {r['p99_us'] / 1000:.1f} |"
        )
    print(
        f"big photos: {len(big)} answered, median {1000 * statistics.median(big):.0f} ms, "
        f"max {1000 * max(big):.0f} ms"
    )


if __name__ == "__main__":
    main()
