"""The realtime voice loop: WebSocket server and client, VAD -> ASR -> engine -> TTS, barge-in.

May import engine; must not import tui.
"""
