"""`flmjax serve`: the official FLM-Audio websocket protocol, many live sessions in one batched
frame loop (pipeline -> frame_loop -> server; client for tests and users)."""
