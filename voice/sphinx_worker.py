"""The pocketsphinx worker process (`python -m voice.sphinx_worker`): decodes audio as it arrives.

pocketsphinx holds the GIL while it decodes, so it runs here, in a child process that imports nothing
but pocketsphinx and starts in well under a second. Requests come on stdin as frames of one kind byte
and a 4-byte little-endian length: A = pcm16 16 kHz audio, T = transcribe, R = reset. Replies go to
stdout as JSON lines: {"ready": true} once, then {"text": ..., "seconds": ...} per T. EOF quits.
"""

from __future__ import annotations

import json
import struct
import sys
import time

ASR_RATE = 16_000
HEADER = struct.Struct("<cI")


def main() -> None:
    from pocketsphinx import Decoder

    decoder = Decoder(samprate=ASR_RATE, loglevel="FATAL")
    stdin, stdout = sys.stdin.buffer, sys.stdout
    print(json.dumps({"ready": True}), file=stdout, flush=True)
    segments: list[str] = []  # one per pause: speech that resumes after a transcript starts a new utterance
    in_utt = False
    while header := stdin.read(HEADER.size):
        kind, size = HEADER.unpack(header)
        payload = stdin.read(size) if size else b""
        if kind == b"A":
            if not in_utt:
                decoder.start_utt()
                in_utt = True
            decoder.process_raw(payload, False, False)
            continue
        t0 = time.perf_counter()
        if in_utt:
            decoder.end_utt()
            in_utt = False
            hyp = decoder.hyp()
            if hyp is not None and hyp.hypstr:
                segments.append(hyp.hypstr)
        if kind == b"R":
            segments = []
        else:
            print(json.dumps({"text": " ".join(segments), "seconds": time.perf_counter() - t0}), file=stdout, flush=True)


if __name__ == "__main__":
    main()
