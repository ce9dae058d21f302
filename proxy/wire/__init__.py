"""The OpenAI wire format: request and response models (protocol) and server-sent-event framing (sse), shared by
the HTTP layer, the runs and the backends."""
