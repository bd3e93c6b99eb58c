"""Images in requests: taken from each protocol's parts, fetched when allowed, tokenized with the projector.

images      Image (decoded header, hash), the request's image parts per protocol, the limits
fetch       remote http(s) images, when the manifest allows them: timeout, size cap, no
            private or loopback addresses
projector   the prompt cut at its image markers, as tokens the scheduler batches (each image a
            run of placeholder ids); libmtmd itself is behind :mod:`deployer.runtime.llama`
"""
