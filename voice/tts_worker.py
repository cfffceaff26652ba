"""The espeak-ng worker process (`python -m voice.tts_worker`): libespeak-ng runs here, not in the server.

libespeak-ng is C with fixed-size buffers (version 1.52's `SetVoiceByName` overflowed a 40-byte one on a long voice
name, and glibc aborted the whole process). In this child process a crash costs the clause being spoken; the server
reports that response as failed and starts a new worker for the next one.

It imports nothing but ctypes and the wheel's loader. Protocol, one request at a time: it first writes one JSON line,
{"rate": Hz, "voices": [language codes], "variants": [variant names]}, the closed list of what it can speak; then per
request line {"text", "voice", "speed", "words_per_minute", "end_pause"} it writes one JSON line, {"samples": n} or
{"error": message}, followed by n int16 samples at `rate`. EOF on stdin quits.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

# espeak-ng's speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000
_POS_CHARACTER = 1
_RATE = 1
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
MAX_NAME_BYTES = 39  # espeak copies a voice name into 40-byte buffers


class Voice(ctypes.Structure):
    """speak_lib.h's espeak_VOICE."""

    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_void_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte), ("xx1", ctypes.c_ubyte),
                ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


class Espeak:
    def __init__(self):
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
        self.rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent, _INITIALIZE_DONT_EXIT)
        if self.rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise (data in {data_parent.decode()})")
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(Voice))
        lib.espeak_ListVoices.argtypes = [ctypes.POINTER(Voice)]
        self.lib = lib
        self.chunks: list[bytes] = []
        self.callback = _SYNTH_CALLBACK(self._on_audio)  # keep a reference: ctypes must not collect it
        lib.espeak_SetSynthCallback(self.callback)
        # every installed voice by each language code it speaks ('en-us', 'en'), every variant by its file name ('m3')
        self.voices = sorted({code for v in self._list(None) for code in _languages(v.languages)})
        variant = ctypes.create_string_buffer(b"variant")  # the language that lists variants instead of voices
        spec = Voice(languages=ctypes.cast(variant, ctypes.c_void_p).value)
        self.variants = sorted({v.identifier.decode().removeprefix("!v/") for v in self._list(ctypes.byref(spec))})

    def _list(self, spec) -> list[Voice]:
        found, array, i = [], self.lib.espeak_ListVoices(spec), 0
        while array[i]:
            found.append(array[i].contents)
            i += 1
        return found

    def _on_audio(self, wav, n: int, events) -> int:
        if wav and n > 0:
            self.chunks.append(ctypes.string_at(wav, 2 * n))
        return 0

    def knows(self, voice: str) -> bool:
        base, _, variant = voice.partition("+")
        return (base in self.voices and (not variant or variant in self.variants)
                and len(voice.encode()) <= MAX_NAME_BYTES)

    def speak(self, text: str, voice: str, speed: float, words_per_minute: int, end_pause: bool) -> bytes:
        if not self.knows(voice):  # the server checks too; native code sees only names from the list
            raise ValueError(f"unknown espeak-ng voice {voice!r}")
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng could not select voice {voice!r}")
        self.lib.espeak_SetParameter(_RATE, round(words_per_minute * speed), 0)
        data = text.encode("utf-8") + b"\0"
        self.chunks = []
        self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8 | (_ENDPAUSE if end_pause else 0), None, None)
        return b"".join(self.chunks)


def _languages(address: int | None) -> list[str]:
    """speak_lib.h's `languages`: (a priority byte, a NUL-terminated code) repeated, ending with a zero priority."""
    codes = []
    while address and (priority := ctypes.string_at(address, 1)) != b"\0":
        code = ctypes.string_at(address + len(priority))
        codes.append(code.decode())
        address += len(priority) + len(code) + 1
    return codes


def main() -> None:
    espeak = Espeak()
    out = sys.stdout.buffer
    out.write(json.dumps({"rate": espeak.rate, "voices": espeak.voices, "variants": espeak.variants}).encode() + b"\n")
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        try:
            pcm = espeak.speak(request["text"], request["voice"], request["speed"], request["words_per_minute"],
                               request["end_pause"])
        except ValueError as e:
            out.write(json.dumps({"error": str(e)}).encode() + b"\n")
        else:
            out.write(json.dumps({"samples": len(pcm) // 2}).encode() + b"\n" + pcm)
        out.flush()


if __name__ == "__main__":
    main()
