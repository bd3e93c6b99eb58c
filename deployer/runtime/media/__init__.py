"""Images and audio in requests: taken from each protocol's parts, fetched when allowed, tokenized with the projector.

images      Image (decoded header, hash), the request's image and input_audio parts per protocol, the limits
audio       Audio: a clip's format and length read from its WAV, MP3 or FLAC header before libmtmd decodes it
fetch       remote http(s) images, when the manifest allows them: timeout, size cap, no
            private or loopback addresses
projector   the prompt cut at its media markers, as tokens the scheduler batches (each image or
            audio chunk a run of placeholder ids); libmtmd itself is behind :mod:`deployer.runtime.llama`
"""
