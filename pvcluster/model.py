"""The version of the timing model: what a run's virtual-time trace depends on besides its spec, seed, kernels and
faults (window rules, costs charged, scheduler and link behaviour, trace vocabulary).

A run directory records it (``run.json``); ``pvcluster up --replay`` refuses a run recorded under another version,
because its trace could not be reproduced. Bump it with every change that moves a single virtual-time event.
"""

# 10: a vCPU leaves its pCPU at its own clock; deliveries inside a window apply at their arrival, and a vCPU resumes
# no earlier than the latest delivery its domain applied; toolstack pauses nest.
# 11: a domain's running vCPUs take turns in steps of ipi_ns and deliver IPIs between them themselves; a trap ends
# such a window there; instructions are priced by class, interrupts, MMIO, multicall entries and hypervisor flushes
# cost time; guest marks are free and stamped at their own instruction (pvcluster/costs.py).
MODEL_VERSION = 11
