"""The TLB-shootdown design a domain runs, named the same way by the domain's trace and by trace analysis."""

from __future__ import annotations


def mode_of(domain: dict[str, str]) -> str:
    """The shootdown design a domain runs: its backend's flush_tlb_others, or IPIs that reload cr3, or the name a
    ``design=NAME`` word on its command line gives it."""
    backend = domain.get("backend", "")
    for word in domain.get("cmdline", "").split():
        # a guest of your own (a hypercall extension's) names its design: "design=batched" (README, "Try your own
        # interface")
        if word.startswith("design=") and len(word) > len("design="):
            return word.removeprefix("design=")
    if "tlbflush=cr3" in domain.get("cmdline", ""):
        return f"cr3 ({backend})"
    return {"native": "native", "xen": "pv", "vmi": "pv (vmi rom)"}.get(backend, "?")
