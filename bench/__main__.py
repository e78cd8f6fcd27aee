"""`python -m bench`: run every benchmark and print the ratios measured in this one run."""

from __future__ import annotations

from bench import hypercall_rtt, multicall, pvops


def main() -> None:
    hypercall_rtt.main()
    print()
    pvops.main()
    print()
    multicall.main()


if __name__ == "__main__":
    main()
