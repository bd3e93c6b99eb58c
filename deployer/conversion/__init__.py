"""Converting Transformers weights (``convert_from``): planned from the checkpoint's headers, run by llama.cpp.

A model published as SafeTensors or PyTorch ``.bin`` weights is planned like a GGUF model, from
the GGUF its conversion will write, predicted before anything is downloaded; the rendered Modal
app (or ``gguf-deploy serve``, locally) then converts it once with llama.cpp's own converter.

    checkpoint.py   pure: config.json + the checkpoint's tensor listing → the predicted GGUF header
                    and size; the one table of convertible architectures (LAYOUTS)
    resolve.py      the checkpoint repo on the hub (through deployer.hub's HubClient) → the facts of
                    the converted GGUF, and where it lives; CONVERSIONS, given to deployer.hub.Resolver
    job.py          pure: facts → the Modal app's conversion job (files to download, the job as data,
                    the conversion container's memory and timeout), for deployer.render
    converter.py    runs the conversion: llama.cpp's convert_hf_to_gguf.py from the pinned source
                    release, then its quantizer; checked against the plan, written atomically. Runs in
                    the Modal app's container and in ``serve``; imports no planning module
    local.py        ``serve`` of a convert_from manifest: resolve, download, convert into the local cache

Imports go one way. Inside: resolve → checkpoint; local → resolve, converter. Outward, the
package imports only lower layers (errors, facts, quants, gguf_header, cache, manifest, and
deployer.hub's client and Resolver); deployer.hub imports nothing of it: whoever builds a
Resolver passes ``conversions=CONVERSIONS`` in. Above it: render (job), scaffold (resolve),
local_model (local), the CLI, and the rendered app (converter). A test keeps the graph acyclic.

This file imports nothing: ``python -m deployer.conversion.converter`` (the quantizer's child
process) and the Modal app's conversion container load it.
"""
