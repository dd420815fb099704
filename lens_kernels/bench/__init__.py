"""The benchmark harness behind ``lens-bench``: cases with their byte/FLOP models, providers (ours per
backend, eager TRL-style torch, torch.compile, Liger-Kernel, Cut-Cross-Entropy), timing, memory, the
measured floor, and table/JSON/markdown/PNG output."""
from .cases import Case, cpu_cases, grid_cases, headline_cases, make_inputs
from .cli import main
from .providers import Provider, Unavailable, providers_for
from .runner import compare, run_all, run_case, within_tolerance

__all__ = ["Case", "Provider", "Unavailable", "compare", "cpu_cases", "grid_cases", "headline_cases", "main",
           "make_inputs", "providers_for", "run_all", "run_case", "within_tolerance"]
