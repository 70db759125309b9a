#!/usr/bin/env python3
"""One streaming completion from `ember serve`, timed by the client.

    sse_client.py PORT PROMPT MAX_TOKENS

Prints the time to the first event with text and the events' rate after it (the client's view
of the server's "generated N at X t/s"). Standard library only: the device has no PyPI.
"""
import http.client
import json
import sys
import time

port, prompt, max_tokens = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
t0 = time.perf_counter()
conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
resp = conn.getresponse()
first = None
pieces = 0
last = t0
for raw in resp:
    line = raw.decode("utf-8", "replace").strip()
    if not line.startswith("data: ") or line == "data: [DONE]":
        continue
    text = json.loads(line[6:])["choices"][0].get("text", "")
    if text:
        last = time.perf_counter()
        pieces += 1
        if first is None:
            first = last
if first is None:
    print("client: no text received")
else:
    rate = (pieces - 1) / (last - first) if pieces > 1 and last > first else float("nan")
    print(f"client: first text after {1000 * (first - t0):.1f} ms, then {pieces - 1} events at {rate:.1f} /s")
