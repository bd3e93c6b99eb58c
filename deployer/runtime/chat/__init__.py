"""Chat templates: messages into a prompt, and the model's text back into message fields.

    template   ChatTemplate: the GGUF's Jinja template (or a named chat_format) renders messages,
               tools and the thinking switch; continues a final assistant message (prefill)
    learn      what a template's own rendering teaches: its tool-call syntax and reasoning markers
               (as llama.cpp's Autoparser does), no list of families needed
    families   the few hand-written syntaxes (Syntax, HandWritten): the one table of family knowledge
    scan       the streaming scanner: text into settled pieces (text, reasoning, tool-call units)
    nested     tool calls whose arguments are tags (MiniMax, Qwen3-Coder style)
    harmony    gpt-oss's Harmony channels
    parser     ChatParser: per choice, the scanner's pieces as message deltas (content,
               reasoning_content, tool_calls)
    grammar    GBNF that forces a required or named tool call in the learned syntax

Pure: nothing here imports llama.cpp. The two things it borrows from llama-cpp-python (a named
chat_format's formatter, the JSON-schema-to-GBNF converter) come in through the model interface
(:class:`deployer.runtime.engine.model.ModelInterface`).
"""
