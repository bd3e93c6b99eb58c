"""The wire protocols: each decodes its requests onto one internal request and encodes the answers.

    request      GenerationRequest: the one typed request every protocol maps onto, and the
                 extensions (llama-server's and vLLM's fields) every protocol honours
    openai       Chat Completions and Completions: decoders (encoders: ``deployer.runtime.prepare``)
    responses    OpenAI's Responses API: decoder, encoder (JSON and SSE events)
    store        the Responses API's per-container store (LRU, bounded in bytes)
    messages     Anthropic's Messages API: decoder, encoder, errors in Anthropic's shape
    items        the chat parser's deltas as output items (text, reasoning, tool calls): what the
                 Responses and Messages encoders share

Below the encoders nothing knows which protocol asked: the engine, the slots and the prompt cache,
the chat template, tool-call parsing and reasoning separation are shared.
"""
