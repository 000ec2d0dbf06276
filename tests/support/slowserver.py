"""A deliberately slow /classify server with a known capacity: one worker, a fixed service time per image.

    python tests/support/slowserver.py --service-ms 5      # prints its URL once listening on 127.0.0.1

Requests are served first come, first served by one worker that spends exactly `n x service` on a
request of n images: an M/D/1 queue under Poisson arrivals, whose latency distribution is known in
closed form. The worker's time is kept on a virtual clock (each request finishes at max(arrival, the
previous finish) + its service time, then the answer is sent), so a late wake-up of this process delays
one answer but never the ones behind it: the queue is the model's, not the event loop's.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web


class SlowWorker:
    def __init__(self, service_s: float) -> None:
        self.service_s = service_s
        self.free_at = 0.0  # loop time when the worker finishes what it has been given

    async def classify(self, request: web.Request) -> web.Response:
        images = 0
        reader = await request.multipart()
        async for part in reader:
            if part.name == "images":
                images += 1
                await part.read()
        if images == 0:
            return web.json_response({"error": "no images", "detail": "send a multipart `images` field"}, status=400)
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.free_at = max(now, self.free_at) + images * self.service_s
        await asyncio.sleep(self.free_at - now)
        return web.Response(text=json.dumps([{"282": 0.9, "281": 0.1}] * images), content_type="application/json")


async def serve(service_ms: float) -> None:
    app = web.Application()
    app.router.add_post("/classify", SlowWorker(service_ms / 1000).classify)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"http://127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()  # until the test stops this process


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--service-ms", type=float, required=True, help="service time per image")
    asyncio.run(serve(parser.parse_args().service_ms))
