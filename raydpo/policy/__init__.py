"""The policy endpoint: the current policy behind an OpenAI-compatible API on Ray Serve
(`app`), the registry its replicas follow (`registry`), and the loop's side (`endpoint`)."""
