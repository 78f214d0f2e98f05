"""Benchmark shapes, in one place. GPU shapes are ../shared/ANCHORS.md section 1 (N, d, V)."""

LOGPROB_GPU = [
    (1024, 3584, 151936),
    (4096, 3584, 151936),
    (16384, 3584, 151936),
    (16384, 1536, 151936),
    (8192, 4096, 128256),
    (65536, 1536, 151936),
]
# forward + backward shapes from ANCHORS.md (the 65536 row one is forward only there)
LOGPROB_GPU_BWD = [(16384, 3584, 151936), (16384, 1536, 151936), (8192, 4096, 128256)]

# CPU: small enough for CI (the Triton provider runs interpreted when TRITON_INTERPRET=1)
LOGPROB_CPU = [(256, 576, 49152), (1024, 576, 49152)]
LOGPROB_SMOKE = [(64, 64, 1000), (37, 31, 5003)]
