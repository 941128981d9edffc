"""Pure scheduling decisions: memory estimates, admission, lease choice.

Stdlib only, no I/O, no clock reads: every input (including the time) is an argument, so each
decision is a plain function that tests can drive exhaustively.
"""

from .admission import Candidate, Decision, admit, headroom, pressure_victim
from .leases import Request, choose, phase_offsets
from .memory import Footprint, estimate, fmt_bytes, refine

__all__ = [
    "Candidate",
    "Decision",
    "Footprint",
    "Request",
    "admit",
    "choose",
    "estimate",
    "fmt_bytes",
    "headroom",
    "phase_offsets",
    "pressure_victim",
    "refine",
]
