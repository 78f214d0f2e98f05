"""Benchmark shapes, in one place. GPU shapes (N, d, V) of 7B-class models with 128k-152k vocabularies."""

LOGPROB_GPU = [
    (1024, 3584, 151936),
    (4096, 3584, 151936),
    (16384, 3584, 151936),
    (16384, 1536, 151936),
    (8192, 4096, 128256),
    (65536, 1536, 151936),
]
# forward + backward shapes (the 65536 row one is forward only)
LOGPROB_GPU_BWD = [(16384, 3584, 151936), (16384, 1536, 151936), (8192, 4096, 128256)]

# CPU: small enough for CI (the Triton provider runs interpreted when TRITON_INTERPRET=1)
LOGPROB_CPU = [(256, 576, 49152), (1024, 576, 49152)]
LOGPROB_SMOKE = [(64, 64, 1000), (37, 31, 5003)]


def select(cases: list[tuple[int, int, int]], spec: str | None) -> list[tuple[int, int, int]]:
    """The cases named in `spec` ("16384x3584x151936,4096x3584x151936"), in the set's order; all if None."""
    if not spec:
        return cases
    wanted = {tuple(int(x) for x in item.split("x")) for item in spec.split(",")}
    unknown = wanted - set(cases)
    if unknown:
        raise SystemExit(f"--cases: {sorted(unknown)} not in the shape set {cases}")
    return [c for c in cases if c in wanted]
