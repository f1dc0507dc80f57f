"Hard instance families for the capped-simplex min-norm solver: (name, G `[M, M]` float64 numpy, C)."
import numpy as np


def gradients(rng, M: int, kind: str) -> np.ndarray:
    "Teacher gradients `[M, K]` of one family: rank one (one sign or mixed), rank two, full rank, duplicated rows, common offset."
    if kind == "rank1_pos": return np.abs(rng.normal(size=(M, 1))) + 0.1
    if kind == "rank1_mixed": return rng.normal(size=(M, 1))
    if kind == "rank2": return rng.normal(size=(M, 2))
    if kind == "full": return rng.normal(size=(M, M + 3))
    if kind == "duplicated":
        g = rng.normal(size=(M, 3))
        g[1::2] = g[0]                                         # several copies of one gradient
        return g
    if kind == "collinear": return rng.normal(size=(M, 1)) * rng.normal(size=(1, 4)) + 1e-9 * rng.normal(size=(M, 4))
    if kind == "offset": return rng.normal(size=(M, 4)) + 5 * rng.normal(size=4)   # all near one common direction
    raise ValueError(kind)


KINDS = ("rank1_pos", "rank1_mixed", "rank2", "full", "duplicated", "collinear", "offset")


def caps(M: int) -> tuple:
    "C at the bottom (1/M + tiny), in between, and at the top."
    return (1 / M + 1e-12, 1 / M + 1e-7, min(1.0, 1.5 / M), 0.6 if M > 1 else 1.0, 1.0)


def instances(seed: int, Ms, scales=(1.0, 1e-8, 1e8), reps: int = 1):
    "Every (family, M, C, scale) combination, `reps` random draws each."
    rng = np.random.default_rng(seed)
    for M in Ms:
        for kind in KINDS:
            for C in caps(M):
                for s in scales:
                    for _ in range(reps):
                        g = gradients(rng, M, kind)
                        yield f"{kind} M={M} C={C:.6g} scale={s:g}", s * (g @ g.T), max(C, 1 / M)
