"""The version of the timing model: what a run's virtual-time trace depends on besides its spec, seed, kernels and
faults (window rules, costs charged, scheduler and link behaviour, trace vocabulary).

A run directory records it (``run.json``); ``pvcluster up --replay`` refuses a run recorded under another version,
because its trace could not be reproduced. Bump it with every change that moves a single virtual-time event.
"""

MODEL_VERSION = 9
